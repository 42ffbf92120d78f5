//! High availability on one machine (issue 12, item 5): two `meshsign serve`
//! processes (the real binary) share one plug-in CA directory and one real
//! kube-apiserver (`tests/kube/apiserver.sh`), authenticate workloads with
//! TokenReview, and elect one root publisher with the Lease. Workloads renew
//! continuously across both with istio-agent's retry policy, and the replica
//! holding the Lease is killed with SIGKILL in the middle of the load.
//!
//! Required, from facts (status codes, the Lease, ConfigMap contents), not
//! from log text:
//! * before the kill both replicas issued certificates and no call failed;
//! * no renewal fails after the client's retries, and every answer verifies
//!   and carries the CA's root;
//! * the Lease moves to the survivor within the bound the election allows;
//! * the survivor keeps the root ConfigMaps current: a new namespace gets
//!   one, a deleted one is restored and an edited one put back, each holding
//!   exactly the CA's root; and when a second root is added to the shared CA
//!   directory (step 2 of a root rotation), every ConfigMap, and every answer
//!   from then on, carries both.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::kube::{Kube, KubeApiServer};
use common::{eventually_some, Workload};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client};
use meshsign::ca::generate;
use meshsign::client::{self, CaEndpoint, CertificateRequest, WorkloadKeyType};
use time::OffsetDateTime;
use tonic::transport::Channel;
use tonic::Code;

/// `kubernetes.root_certificates.lease_duration`: the shortest allowed.
const LEASE_DURATION: Duration = Duration::from_secs(2);
const LEASE_NAMESPACE: &str = "ha-leases";
/// The default `lease_name`.
const LEASE_NAME: &str = "meshsign-root-publisher";
/// The replicas' `holder_identity`.
const REPLICAS: [&str; 2] = ["replica-a", "replica-b"];
/// Namespaces with this label get the root ConfigMap.
const SELECTED: (&str, &str) = ("meshsign-test/ha", "on");
const APP_NAMESPACE: &str = "ha-app";
const CONFIGMAP: &str = "istio-ca-root-cert";
const CONFIGMAP_KEY: &str = "root-cert.pem";
/// Workloads (pods) renewing at once, each with its own pod-bound token.
const WORKERS: usize = 4;
/// Pause between one workload's renewals (about 4 × 50 renewals a second in
/// all: load, without starving the API server on two cores).
const PACE: Duration = Duration::from_millis(20);
/// Renewals each replica must have issued before the kill, and the survivor
/// after it.
const MIN_SERVED: u64 = 25;
/// Load before the kill.
const LOAD_BEFORE_KILL: Duration = Duration::from_secs(1);
/// How long anything may take to show up on a busy two-core machine.
const PATIENCE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// The replicas: real `meshsign serve` processes.

/// A free loopback port below the kernel's ephemeral range (32768+), as
/// `tests/kube/apiserver.sh` picks its own, so that an outgoing connection
/// cannot take it between this check and meshsign's bind.
fn free_port() -> u16 {
    loop {
        let mut b = [0u8; 2];
        aws_lc_rs::rand::fill(&mut b).expect("random");
        let port = 20_000 + u16::from_be_bytes(b) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// One `meshsign serve` process; killed (and its log printed, when the test
/// is failing) when dropped.
struct Replica {
    identity: &'static str,
    port: u16,
    monitoring: u16,
    log: PathBuf,
    child: Child,
}

impl Replica {
    /// Starts the binary with the shared CA directory and kubeconfig and waits
    /// until it is ready. A start that fails (a port taken in the meantime)
    /// is tried again on other ports.
    async fn start(
        identity: &'static str,
        dir: &Path,
        ca_dir: &Path,
        kubeconfig: &Path,
    ) -> Replica {
        for _ in 0..3 {
            let (port, monitoring) = (free_port(), free_port());
            let state = dir.join(format!("{identity}-state"));
            let config = dir.join(format!("{identity}.yaml"));
            // Each pod here renews continuously, far above a real pod's one
            // call every few hours: the per-caller budget is off (tests/limits.rs
            // tests it).
            std::fs::write(
                &config,
                format!(
                    "listen: \"127.0.0.1:{port}\"\n\
                     monitoring: {{ listen: \"127.0.0.1:{monitoring}\" }}\n\
                     state_dir: {state:?}\n\
                     ca: {{ dir: {ca:?}, reload_interval: 1s }}\n\
                     rate_limits: {{ per_caller: {{ per_second: 0 }} }}\n\
                     kubernetes:\n\
                     \x20 clusters:\n\
                     \x20   - {{ id: Kubernetes, kubeconfig: {kubeconfig:?} }}\n\
                     \x20 root_certificates:\n\
                     \x20   namespace_selector: \"{label}={value}\"\n\
                     \x20   lease_namespace: {LEASE_NAMESPACE}\n\
                     \x20   lease_duration: {lease}s\n\
                     \x20   holder_identity: {identity}\n\
                     \x20   resync: 1s\n",
                    state = state.display().to_string(),
                    ca = ca_dir.display().to_string(),
                    kubeconfig = kubeconfig.display().to_string(),
                    label = SELECTED.0,
                    value = SELECTED.1,
                    lease = LEASE_DURATION.as_secs(),
                ),
            )
            .expect("write config");
            let log = dir.join(format!("{identity}.log"));
            let child = Command::new(env!("CARGO_BIN_EXE_meshsign"))
                .args(["serve", "--config"])
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .spawn()
                .expect("start meshsign");
            let mut replica = Replica {
                identity,
                port,
                monitoring,
                log,
                child,
            };
            if replica.wait_ready().await {
                return replica;
            }
            eprintln!(
                "{identity} exited at start, trying other ports:\n{}",
                replica.log_tail()
            );
        }
        panic!("{identity} did not start");
    }

    /// True once `/healthz/ready` answers 200 and the gRPC port accepts
    /// connections; false if the process exited first.
    async fn wait_ready(&mut self) -> bool {
        let ready = format!("http://127.0.0.1:{}/healthz/ready", self.monitoring);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if self.child.try_wait().expect("try_wait").is_some() {
                return false;
            }
            let healthy = reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200);
            if healthy
                && tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
            {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready within {PATIENCE:?}:\n{}",
                self.identity,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn endpoint(&self, roots: &[rustls_pki_types::CertificateDer<'static>]) -> CaEndpoint {
        CaEndpoint {
            addr: format!("127.0.0.1:{}", self.port),
            server_name: Some("localhost".into()),
            roots: roots.to_vec(),
            client_identity: None,
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- {} log (tail) ---\n{}", self.identity, self.log_tail());
        }
    }
}

// ---------------------------------------------------------------------------
// The client: workloads renewing across both replicas, retrying as
// istio-agent does.

/// istio-agent's CA client retries (`security/pkg/nodeagent/caclient`
/// `RetryOptions`): up to 5 retries, exponential backoff from 100 ms with 10%
/// jitter, on these codes.
const MAX_RETRIES: u32 = 5;
const RETRY_CODES: [Code; 6] = [
    Code::Cancelled,
    Code::DeadlineExceeded,
    Code::ResourceExhausted,
    Code::Aborted,
    Code::Internal,
    Code::Unavailable,
];
/// A call with no answer within this is abandoned (`DEADLINE_EXCEEDED`).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a replica the client could not reach is left out.
const EJECTION: Duration = Duration::from_secs(1);

fn backoff(retry: u32) -> Duration {
    let base = Duration::from_millis(100) * (1 << (retry - 1));
    let mut b = [0u8; 1];
    aws_lc_rs::rand::fill(&mut b).expect("random");
    // ±10%.
    base.mul_f64(0.9 + 0.2 * f64::from(b[0]) / 255.0)
}

/// Spreads calls over the replicas, round robin. The agent dials a Service,
/// whose endpoints stop including a pod that is gone; here a replica the
/// client could not reach is skipped for [`EJECTION`], then tried again by
/// the next call that picks it.
#[derive(Default)]
struct Balancer {
    next: AtomicUsize,
    ejected_until: Mutex<[Option<Instant>; 2]>,
}

impl Balancer {
    fn pick(&self) -> usize {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let ejected = self.ejected_until.lock().unwrap();
        let now = Instant::now();
        (0..2)
            .map(|k| (start + k) % 2)
            .find(|&i| ejected[i].is_none_or(|until| until <= now))
            .unwrap_or(start % 2)
    }

    fn eject(&self, i: usize) {
        self.ejected_until.lock().unwrap()[i] = Some(Instant::now() + EJECTION);
    }
}

/// A failed call.
#[derive(Debug)]
struct CallError {
    code: Code,
    /// Why there was no answer from the server (connecting failed, the
    /// connection broke, no answer in time), if there was none. grpc-go
    /// reports the first two as `UNAVAILABLE`.
    connection: Option<&'static str>,
    message: String,
}

/// One call to replica `ep` on this workload's channel to it (opened when
/// there is none; dropped when it broke).
async fn call(
    channel: &mut Option<Channel>,
    ep: &CaEndpoint,
    wl: &Workload,
    token: &str,
) -> Result<Vec<String>, CallError> {
    let unreachable = |why: &'static str, message: String| CallError {
        code: Code::Unavailable,
        connection: Some(why),
        message,
    };
    let ch = match channel {
        Some(ch) => ch.clone(),
        None => {
            let ch = tokio::time::timeout(CALL_TIMEOUT, client::channel(ep))
                .await
                .map_err(|_| unreachable("connect", format!("connect {}: timed out", ep.addr)))?
                .map_err(|e| unreachable("connect", e))?;
            *channel = Some(ch.clone());
            ch
        }
    };
    let mut ca =
        meshsign::proto::istio_certificate_service_client::IstioCertificateServiceClient::new(ch);
    let request = CertificateRequest {
        csr_pem: wl.csr(),
        ttl_seconds: 3600,
        token: Some(token),
        cluster_id: "Kubernetes",
        impersonate: None,
    };
    let result =
        tokio::time::timeout(CALL_TIMEOUT, client::create_certificate(&mut ca, &request)).await;
    match result {
        Ok(Ok(elements)) => Ok(elements),
        // A status the server sent has no source; one with a source is
        // tonic's report of a transport failure (often `UNKNOWN`).
        Ok(Err(status)) if std::error::Error::source(&status).is_some() => {
            *channel = None;
            Err(unreachable(
                "connection lost",
                format!("{}: {}", ep.addr, status.message()),
            ))
        }
        Ok(Err(status)) => Err(CallError {
            code: status.code(),
            connection: None,
            message: status.message().to_owned(),
        }),
        Err(_) => {
            *channel = None;
            Err(CallError {
                code: Code::DeadlineExceeded,
                connection: Some("no answer"),
                message: format!("{}: no answer within {CALL_TIMEOUT:?}", ep.addr),
            })
        }
    }
}

/// What the workloads saw.
#[derive(Debug, Default)]
struct Stats {
    /// Certificates issued by each replica, before and after the kill.
    served: [[u64; 2]; 2],
    /// Answers carrying both roots.
    both_roots: u64,
    /// Renewals that needed at least one retry.
    retried: u64,
    most_retries: u32,
    /// Failed calls by replica, phase and kind.
    call_errors: BTreeMap<String, u64>,
    /// Renewals that failed after the retries, or got a bad answer.
    failures: Vec<String>,
}

/// Shared by the workloads and the test.
struct Load {
    endpoints: [CaEndpoint; 2],
    /// The root bundles an answer may carry: the CA's root, and from the
    /// rotation step on, both roots.
    root_bundles: [String; 2],
    balancer: Balancer,
    killed: AtomicBool,
    stop: AtomicBool,
    stats: Mutex<Stats>,
}

impl Load {
    fn phase(&self) -> usize {
        usize::from(self.killed.load(Ordering::SeqCst))
    }

    fn served(&self, replica: usize, phase: usize) -> u64 {
        self.stats.lock().unwrap().served[replica][phase]
    }

    /// Counts one renewal's outcome, after checking the answer.
    fn record(
        &self,
        wl: &Workload,
        outcome: Result<(usize, Vec<String>), CallError>,
        retries: u32,
    ) {
        let phase = self.phase();
        let mut stats = self.stats.lock().unwrap();
        let (i, elements) = match outcome {
            Ok(answer) => answer,
            Err(e) => {
                stats.failures.push(format!(
                    "after {retries} retries: {:?} {}",
                    e.code, e.message
                ));
                return;
            }
        };
        let issued =
            match client::verify_response(&elements, &wl.key, &wl.id, OffsetDateTime::now_utc()) {
                Ok(issued) => issued,
                Err(e) => {
                    let replica = REPLICAS[i];
                    stats
                        .failures
                        .push(format!("{replica}: the answer does not verify: {e}"));
                    return;
                }
            };
        if !self.root_bundles.contains(&issued.root_pem) {
            let replica = REPLICAS[i];
            stats
                .failures
                .push(format!("{replica}: the answer's root is not the CA's"));
            return;
        }
        stats.served[i][phase] += 1;
        if issued.root_pem == self.root_bundles[1] {
            stats.both_roots += 1;
        }
        if retries > 0 {
            stats.retried += 1;
            stats.most_retries = stats.most_retries.max(retries);
        }
    }
}

/// One workload renewing until told to stop.
async fn renew_continuously(load: Arc<Load>, wl: Workload, token: String) {
    let mut channels: [Option<Channel>; 2] = [None, None];
    while !load.stop.load(Ordering::SeqCst) {
        let mut retries = 0;
        let outcome = loop {
            let i = load.balancer.pick();
            match call(&mut channels[i], &load.endpoints[i], &wl, &token).await {
                Ok(elements) => break Ok((i, elements)),
                Err(e) => {
                    if e.connection.is_some() {
                        load.balancer.eject(i);
                    }
                    let phase = ["before the kill", "after the kill"][load.phase()];
                    let kind = format!(
                        "{} {phase}: {:?}{}",
                        REPLICAS[i],
                        e.code,
                        e.connection
                            .map_or(String::new(), |why| format!(" ({why})"))
                    );
                    *load
                        .stats
                        .lock()
                        .unwrap()
                        .call_errors
                        .entry(kind)
                        .or_default() += 1;
                    if !RETRY_CODES.contains(&e.code) || retries == MAX_RETRIES {
                        break Err(e);
                    }
                    retries += 1;
                    tokio::time::sleep(backoff(retries)).await;
                }
            }
        };
        load.record(&wl, outcome, retries);
        tokio::time::sleep(PACE).await;
    }
}

// ---------------------------------------------------------------------------
// The cluster side.

/// The Lease's holder and transition count.
async fn lease(client: &Client) -> Option<(String, i32)> {
    let lease = Api::<Lease>::namespaced(client.clone(), LEASE_NAMESPACE)
        .get_opt(LEASE_NAME)
        .await
        .expect("get lease")?;
    let spec = lease.spec?;
    Some((spec.holder_identity?, spec.lease_transitions.unwrap_or(0)))
}

async fn root_configmap(client: &Client, ns: &str) -> Option<ConfigMap> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(CONFIGMAP)
        .await
        .expect("get ConfigMap")
}

/// Waits until the root ConfigMap of `ns` holds exactly `roots` (and, when
/// given, is not the object `unless`: (uid, resourceVersion)).
async fn wait_for_roots(
    client: &Client,
    ns: &str,
    roots: &str,
    unless: Option<(&str, &str)>,
) -> ConfigMap {
    eventually_some(&format!("root ConfigMap in {ns}"), PATIENCE, || async {
        root_configmap(client, ns).await.filter(|cm| {
            let data = cm.data.as_ref().and_then(|d| d.get(CONFIGMAP_KEY));
            let same_object = unless.is_some_and(|(uid, version)| {
                cm.metadata.uid.as_deref() == Some(uid)
                    && cm.metadata.resource_version.as_deref() == Some(version)
            });
            data.map(String::as_str) == Some(roots) && !same_object
        })
    })
    .await
}

fn uid_and_version(cm: &ConfigMap) -> (String, String) {
    (
        cm.metadata.uid.clone().expect("uid"),
        cm.metadata
            .resource_version
            .clone()
            .expect("resourceVersion"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_a_ca_and_the_survivor_takes_over_when_the_leader_is_killed() {
    let Some(api) = KubeApiServer::shared() else {
        return;
    };
    let started = Instant::now();
    let k = Kube::new(api).await;
    let c = k.client.clone();
    k.namespace(LEASE_NAMESPACE, &[]).await;
    k.namespace(APP_NAMESPACE, &[SELECTED]).await;
    k.service_account(APP_NAMESPACE, "web").await;
    let mut workloads = Vec::new();
    for i in 0..WORKERS {
        let pod = format!("web-{i}");
        let uid = k.pod(APP_NAMESPACE, &pod, "web", "node-1").await;
        let token = k
            .token(APP_NAMESPACE, "web", "istio-ca", Some((&pod, &uid)))
            .await;
        workloads.push((
            Workload::new(APP_NAMESPACE, "web", WorkloadKeyType::EcdsaP256),
            token,
        ));
    }

    // One CA directory for both.
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("cacerts");
    let now = OffsetDateTime::now_utc();
    let spec =
        |cn: &str| common::ca_spec(cn, generate::KeyType::EcdsaP256, ::time::Duration::days(1));
    let root = generate::root(&spec("ha root"), now).expect("root");
    let intermediate =
        generate::intermediate(&root, &spec("ha intermediate"), now).expect("intermediate");
    generate::write_istio_layout(
        &ca_dir,
        &intermediate,
        &intermediate.cert_pem,
        &root.cert_pem,
    )
    .expect("CA directory");
    let root_pem = root.cert_pem.clone();
    // For the rotation step at the end.
    let both_roots = format!(
        "{root_pem}{}",
        generate::root(&spec("ha new root"), now)
            .expect("new root")
            .cert_pem
    );
    let roots = meshsign::pki::parse_certificates_nonempty(root_pem.as_bytes()).expect("root");

    let (a, b) = tokio::join!(
        Replica::start(REPLICAS[0], dir.path(), &ca_dir, &api.kubeconfig),
        Replica::start(REPLICAS[1], dir.path(), &ca_dir, &api.kubeconfig),
    );
    let mut replicas = [a, b];
    eprintln!("both replicas ready after {:?}", started.elapsed());

    // One of them leads and publishes the root.
    let (first_holder, _) = eventually_some("a Lease holder", PATIENCE, || async {
        lease(&c)
            .await
            .filter(|(h, _)| REPLICAS.contains(&h.as_str()))
    })
    .await;
    wait_for_roots(&c, APP_NAMESPACE, &root_pem, None).await;
    eprintln!("{first_holder} holds the Lease; root ConfigMap published");

    // The load.
    let load = Arc::new(Load {
        endpoints: [replicas[0].endpoint(&roots), replicas[1].endpoint(&roots)],
        root_bundles: [root_pem.clone(), both_roots.clone()],
        balancer: Balancer::default(),
        killed: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        stats: Mutex::default(),
    });
    let load_started = Instant::now();
    let workers: Vec<_> = workloads
        .into_iter()
        .map(|(wl, token)| tokio::spawn(renew_continuously(load.clone(), wl, token)))
        .collect();
    common::eventually("renewals issued by both replicas", PATIENCE, || async {
        load_started.elapsed() >= LOAD_BEFORE_KILL
            && load.served(0, 0) >= MIN_SERVED
            && load.served(1, 0) >= MIN_SERVED
    })
    .await;

    // Kill whichever holds the Lease now.
    let (leader, transitions) = lease(&c).await.expect("lease");
    let leader_index = REPLICAS
        .iter()
        .position(|r| *r == leader)
        .unwrap_or_else(|| panic!("unexpected lease holder {leader:?}"));
    let survivor_index = 1 - leader_index;
    let survivor = REPLICAS[survivor_index];
    load.killed.store(true, Ordering::SeqCst);
    replicas[leader_index].child.kill().expect("SIGKILL");
    let killed_at = Instant::now();
    let status = replicas[leader_index].child.wait().expect("wait");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    eprintln!(
        "killed {leader} (SIGKILL) after {:?} of load",
        load_started.elapsed()
    );

    // The survivor takes the Lease once it has seen it unrenewed for its
    // duration: at most a renewal period after the last renewal, plus the
    // duration, plus a period until it looks again (D + 2D/3 ≈ 3.3 s).
    let new_transitions = eventually_some("the survivor holds the Lease", PATIENCE, || async {
        lease(&c)
            .await
            .filter(|(h, _)| h == survivor)
            .map(|(_, t)| t)
    })
    .await;
    let takeover = killed_at.elapsed();
    eprintln!("{survivor} took the Lease {takeover:?} after the kill");
    assert!(
        takeover <= 2 * LEASE_DURATION + Duration::from_secs(1),
        "takeover took {takeover:?}"
    );
    assert_eq!(new_transitions, transitions + 1, "one change of holder");

    // The survivor keeps the root ConfigMaps current: a new namespace...
    let t = Instant::now();
    k.namespace("ha-after", &[SELECTED]).await;
    wait_for_roots(&c, "ha-after", &root_pem, None).await;
    eprintln!("new namespace got the root after {:?}", t.elapsed());
    // ...a deleted ConfigMap...
    let existing = root_configmap(&c, APP_NAMESPACE).await.expect("ConfigMap");
    let (uid, version) = uid_and_version(&existing);
    let configmaps = Api::<ConfigMap>::namespaced(c.clone(), APP_NAMESPACE);
    configmaps
        .delete(CONFIGMAP, &DeleteParams::default())
        .await
        .expect("delete ConfigMap");
    let t = Instant::now();
    let restored = wait_for_roots(&c, APP_NAMESPACE, &root_pem, Some((&uid, &version))).await;
    assert_ne!(
        restored.metadata.uid.as_deref(),
        Some(uid.as_str()),
        "re-created"
    );
    eprintln!("deleted ConfigMap restored after {:?}", t.elapsed());
    // ...and an edited one.
    let edited = configmaps
        .patch(
            CONFIGMAP,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "data": { CONFIGMAP_KEY: "tampered" } })),
        )
        .await
        .expect("edit ConfigMap");
    let (uid, version) = uid_and_version(&edited);
    let t = Instant::now();
    let fixed = wait_for_roots(&c, APP_NAMESPACE, &root_pem, Some((&uid, &version))).await;
    assert_eq!(fixed.metadata.uid, edited.metadata.uid, "updated in place");
    eprintln!("edited ConfigMap put back after {:?}", t.elapsed());

    // A second root in the shared CA directory (a root rotation's step 2):
    // the survivor reloads it, publishes both roots, and answers with both.
    generate::write_file(&ca_dir.join("root-cert.pem"), &both_roots, false)
        .expect("write both roots");
    let t = Instant::now();
    for ns in [APP_NAMESPACE, "ha-after"] {
        wait_for_roots(&c, ns, &both_roots, None).await;
    }
    eprintln!("both roots published after {:?}", t.elapsed());
    common::eventually(
        "renewals issued by the survivor, with both roots",
        PATIENCE,
        || async {
            load.served(survivor_index, 1) >= MIN_SERVED
                && load.stats.lock().unwrap().both_roots > 0
        },
    )
    .await;
    load.stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.expect("workload task");
    }
    assert!(replicas[survivor_index].alive(), "the survivor is running");

    let stats = load.stats.lock().unwrap();
    let renewals: u64 = stats.served.iter().flatten().sum();
    eprintln!(
        "{renewals} renewals in {:?}: issued before/after the kill: {} {:?}, {} {:?}; \
         {} with both roots; {} needed a retry (at most {}); failed calls: {:?}; \
         whole test {:?}",
        load_started.elapsed(),
        REPLICAS[0],
        stats.served[0],
        REPLICAS[1],
        stats.served[1],
        stats.both_roots,
        stats.retried,
        stats.most_retries,
        stats.call_errors,
        started.elapsed(),
    );
    assert!(
        stats.failures.is_empty(),
        "{} renewals failed: {:?}",
        stats.failures.len(),
        stats.failures
    );
    let before_kill: Vec<_> = stats
        .call_errors
        .iter()
        .filter(|(kind, _)| kind.contains("before the kill"))
        .collect();
    assert!(
        before_kill.is_empty(),
        "calls failed while both replicas ran: {before_kill:?}"
    );
    // The kill was felt: some call went to the dead replica and was retried.
    assert!(stats.retried > 0, "no renewal needed a retry");
}
