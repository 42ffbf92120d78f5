//! Bad days, each while workloads keep renewing: the CA directory emptied,
//! made unreadable or given a mismatched key; the JWKS endpoint down or
//! slow; the Kubernetes API server hung, then down, then back; the audit
//! disk really full (a small tmpfs). Each test asserts how the server
//! degrades (status codes, metrics, which CA signs) and that it recovers by
//! itself once the cause is gone, without a restart.
//!
//! The audit disk full under both `on_failure` settings through the storage
//! seam (a write failing with `ENOSPC` after half its bytes) is in
//! `tests/audit.rs`; here the same with a real file system that runs out
//! of space.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::kube::{Kube, KubeApiServer};
use common::{eventually, TestServer, Workload};
use meshsign::ca::generate::{self, CaSpec, GeneratedCa, KeyType};
use meshsign::client::{CaEndpoint, WorkloadKeyType};
use meshsign::config::Config;
use meshsign::pki;
use meshsign::token::{DevTokenIssuer, TokenRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

fn spec(cn: &str) -> CaSpec {
    common::ca_spec(cn, KeyType::EcdsaP256, ::time::Duration::days(30))
}

const CA_FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "cert-chain.pem",
    "root-cert.pem",
];

/// What a stream of renewals saw.
#[derive(Default, Debug, Clone)]
struct Tally {
    ok: u64,
    /// Issuer CN -> certificates.
    issuers: BTreeMap<String, u64>,
    failed: Vec<(Code, String)>,
    slowest: Duration,
}

/// A workload renewing every 50 ms in the background, by token or (no
/// token, a client identity in `ep`) by mTLS, each time on a new connection.
struct Renewals {
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Renewals {
    fn start(ep: CaEndpoint, wl: Arc<Workload>, token: Option<String>) -> Renewals {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (tally.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::SeqCst) {
                let started = Instant::now();
                let result = wl.obtain(&ep, token.as_deref(), 600).await;
                let took = started.elapsed();
                {
                    let mut t = t.lock().unwrap();
                    t.slowest = t.slowest.max(took);
                    match result {
                        Ok((elements, _)) => {
                            t.ok += 1;
                            *t.issuers
                                .entry(common::leaf_issuer_cn(&elements))
                                .or_default() += 1;
                        }
                        Err(e) => t.failed.push(e),
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Renewals { tally, stop, task }
    }

    fn now(&self) -> Tally {
        self.tally.lock().unwrap().clone()
    }

    /// Waits until `n` more renewals succeeded than `since` had.
    async fn wait_more(&self, since: &Tally, n: u64) {
        let want = since.ok + n;
        eventually("renewals go on", Duration::from_secs(20), || async {
            self.now().ok >= want
        })
        .await;
    }

    async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        let t = self.tally.lock().unwrap().clone();
        t
    }
}

/// A token renewal and an mTLS renewal going on against `ep`.
async fn token_and_mtls_renewals(ep: &CaEndpoint, token: String) -> (Renewals, Renewals) {
    let wl = Arc::new(Workload::new("default", "web", WorkloadKeyType::EcdsaP256));
    let (_, issued) = wl.obtain(ep, Some(&token), 3600).await.expect("first");
    let mtls_ep = CaEndpoint {
        client_identity: Some(wl.client_identity(&issued)),
        ..ep.clone()
    };
    (
        Renewals::start(ep.clone(), wl.clone(), Some(token)),
        Renewals::start(mtls_ep, wl, None),
    )
}

/// Both streams renewed `n` more times since `(a, b)`.
async fn both_renew(r: &(Renewals, Renewals), n: u64) {
    let (a, b) = (r.0.now(), r.1.now());
    r.0.wait_more(&a, n).await;
    r.1.wait_more(&b, n).await;
}

async fn finish_clean(r: (Renewals, Renewals)) -> (Tally, Tally) {
    let (token, mtls) = (r.0.finish().await, r.1.finish().await);
    assert!(token.failed.is_empty(), "token renewals failed: {token:?}");
    assert!(mtls.failed.is_empty(), "mTLS renewals failed: {mtls:?}");
    (token, mtls)
}

/// The issuers of everything issued since `(a, b)`.
fn issuers_since(r: &(Renewals, Renewals), a: &Tally, b: &Tally) -> Vec<String> {
    let mut out = Vec::new();
    for (now, before) in [(r.0.now(), a), (r.1.now(), b)] {
        for (cn, n) in now.issuers {
            if n > before.issuers.get(&cn).copied().unwrap_or(0) {
                out.push(cn);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn reloads(result: &str) -> String {
    format!("meshsign_reloads_total{{result=\"{result}\",what=\"ca\"}}")
}

async fn ready(monitoring: std::net::SocketAddr) -> u16 {
    reqwest::get(format!("http://{monitoring}/healthz/ready"))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

fn read_all(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    CA_FILES
        .iter()
        .map(|f| (dir.join(f), std::fs::read(dir.join(f)).unwrap()))
        .collect()
}

/// A root and an intermediate "first" in a fresh directory.
fn ca_dir() -> (tempfile::TempDir, GeneratedCa) {
    let dir = tempfile::tempdir().unwrap();
    let now = ::time::OffsetDateTime::now_utc();
    let root = generate::root(&spec("root"), now).unwrap();
    let first = generate::intermediate(&root, &spec("first"), now).unwrap();
    generate::write_istio_layout(dir.path(), &first, &first.cert_pem, &root.cert_pem).unwrap();
    (dir, root)
}

#[tokio::test]
async fn ca_directory_emptied_keeps_the_last_good_ca_until_restored() {
    let (dir, _root) = ca_dir();
    let ts = TestServer::with_ca_dir_and_reload(dir.path(), "1s").await;
    let monitoring = ts.server.monitoring_addr.unwrap();
    let r = token_and_mtls_renewals(&ts.endpoint(), ts.token("default", "web")).await;
    both_renew(&r, 3).await;

    // Every file gone (a Secret volume emptied, a bad `kubectl apply`).
    let saved = read_all(dir.path());
    for (path, _) in &saved {
        std::fs::remove_file(path).unwrap();
    }
    eventually(
        "the empty directory refused",
        Duration::from_secs(10),
        || async { ts.metric(&reloads("refused")).await >= 1.0 },
    )
    .await;
    let (a, b) = (r.0.now(), r.1.now());
    both_renew(&r, 10).await;
    // Still signing with the CA it had, still ready, nothing swapped.
    assert_eq!(issuers_since(&r, &a, &b), ["first"]);
    assert_eq!(ready(monitoring).await, 200);
    assert_eq!(ts.metric(&reloads("ok")).await, 0.0);

    // The files come back: taken by the watch without a restart.
    for (path, bytes) in &saved {
        std::fs::write(path, bytes).unwrap();
    }
    eventually(
        "the restored bundle reloaded",
        Duration::from_secs(10),
        || async { ts.metric(&reloads("ok")).await >= 1.0 },
    )
    .await;
    let (a, b) = (r.0.now(), r.1.now());
    both_renew(&r, 5).await;
    assert_eq!(issuers_since(&r, &a, &b), ["first"]);
    assert_eq!(ready(monitoring).await, 200);
    finish_clean(r).await;
    ts.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn ca_directory_with_a_mismatched_key_is_refused_until_the_key_matches() {
    let (dir, root) = ca_dir();
    let ts = TestServer::with_ca_dir_and_reload(dir.path(), "1s").await;
    let monitoring = ts.server.monitoring_addr.unwrap();
    let r = token_and_mtls_renewals(&ts.endpoint(), ts.token("default", "web")).await;
    both_renew(&r, 3).await;

    // The next intermediate's certificate arrives, its key does not (yet):
    // ca-key.pem is still the old one.
    let now = ::time::OffsetDateTime::now_utc();
    let second = generate::intermediate(&root, &spec("second"), now).unwrap();
    generate::write_file(&dir.path().join("ca-cert.pem"), &second.cert_pem, false).unwrap();
    generate::write_file(&dir.path().join("cert-chain.pem"), &second.cert_pem, false).unwrap();
    eventually(
        "the mismatched key refused",
        Duration::from_secs(10),
        || async { ts.metric(&reloads("refused")).await >= 1.0 },
    )
    .await;
    let (a, b) = (r.0.now(), r.1.now());
    both_renew(&r, 10).await;
    assert_eq!(issuers_since(&r, &a, &b), ["first"]);
    assert_eq!(ts.metric(&reloads("ok")).await, 0.0);
    assert_eq!(ready(monitoring).await, 200);

    // The matching key lands: the new CA is taken and signs.
    generate::write_file(&dir.path().join("ca-key.pem"), &second.key_pem(), true).unwrap();
    eventually(
        "the completed bundle taken",
        Duration::from_secs(10),
        || async { ts.metric(&reloads("ok")).await >= 1.0 },
    )
    .await;
    let (a, b) = (r.0.now(), r.1.now());
    both_renew(&r, 5).await;
    assert_eq!(issuers_since(&r, &a, &b), ["second"]);
    assert_eq!(ready(monitoring).await, 200);
    finish_clean(r).await;
    ts.server.shutdown().await.unwrap();
}

// --- the CA directory made unreadable: the real binary, without root's DAC override

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `meshsign serve` as a child process that file permissions apply to:
/// run as root (tests often are), it gets no CAP_DAC_OVERRIDE or
/// CAP_DAC_READ_SEARCH (`setpriv`), so `chmod 000` means what it says.
struct ChildServer {
    child: Child,
    port: u16,
    monitoring: std::net::SocketAddr,
}

impl ChildServer {
    async fn start(work: &Path, yaml: &str) -> Option<ChildServer> {
        // reqwest (health and metrics) needs a process-wide provider, which
        // an in-process server would otherwise have installed.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (port, mport) = (free_port(), free_port());
        let config = work.join("meshsign.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: \"127.0.0.1:{port}\"\nmonitoring: {{ listen: \"127.0.0.1:{mport}\" }}\n\
                 state_dir: {:?}\n{yaml}",
                work.join("state").display().to_string()
            ),
        )
        .unwrap();
        let bin = env!("CARGO_BIN_EXE_meshsign");
        // SAFETY: geteuid has no preconditions.
        let mut cmd = if unsafe { libc::geteuid() } == 0 {
            let probe = Command::new("setpriv")
                .args(["--bounding-set=-dac_override,-dac_read_search", "true"])
                .status();
            if !probe.is_ok_and(|s| s.success()) {
                eprintln!("SKIP: running as root without a working setpriv");
                return None;
            }
            let mut c = Command::new("setpriv");
            c.args(["--bounding-set=-dac_override,-dac_read_search", "--", bin]);
            c
        } else {
            Command::new(bin)
        };
        let log = std::fs::File::create(work.join("server.log")).unwrap();
        let child = cmd
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let monitoring: std::net::SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
        let server = ChildServer {
            child,
            port,
            monitoring,
        };
        eventually("the server ready", Duration::from_secs(30), || async {
            ready(monitoring).await == 200
        })
        .await;
        Some(server)
    }

    async fn metric(&self, line_start: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.monitoring))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(line_start))
            .map_or(0.0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn ca_directory_made_unreadable_keeps_the_last_good_ca_and_recovers() {
    let work = tempfile::tempdir().unwrap();
    let (dir, root) = ca_dir();
    let issuer = DevTokenIssuer::load_or_create(&work.path().join("issuer")).unwrap();
    let Some(server) = ChildServer::start(
        work.path(),
        &format!(
            "ca: {{ dir: {:?}, reload_interval: 1s }}\nauthn:\n  jwt:\n    - issuer: meshsign-dev\n      \
             jwks_file: {:?}\nrate_limits: {{ per_caller: {{ per_second: 0 }} }}\n",
            dir.path().display().to_string(),
            issuer.jwks_path().display().to_string()
        ),
    )
    .await
    else {
        return;
    };
    let ep = CaEndpoint {
        addr: format!("localhost:{}", server.port),
        server_name: None,
        roots: pki::parse_certificates_nonempty(
            &std::fs::read(dir.path().join("root-cert.pem")).unwrap(),
        )
        .unwrap(),
        client_identity: None,
    };
    let r = token_and_mtls_renewals(
        &ep,
        issuer.mint(&TokenRequest::new("default", "web")).unwrap(),
    )
    .await;
    both_renew(&r, 3).await;

    // The directory itself made unreadable (a volume's mode, an owner change).
    chmod(dir.path(), 0o000);
    eventually(
        "the unreadable directory refused",
        Duration::from_secs(10),
        || async { server.metric(&reloads("refused")).await >= 1.0 },
    )
    .await;
    let (a, b) = (r.0.now(), r.1.now());
    both_renew(&r, 10).await;
    assert_eq!(issuers_since(&r, &a, &b), ["first"]);
    assert_eq!(server.metric(&reloads("ok")).await, 0.0);
    assert_eq!(ready(server.monitoring).await, 200);
    // Readable again: read, verified and taken (the same CA) by itself.
    chmod(dir.path(), 0o755);
    eventually(
        "the readable directory reloaded",
        Duration::from_secs(10),
        || async { server.metric(&reloads("ok")).await >= 1.0 },
    )
    .await;
    let (a, b) = (r.0.now(), r.1.now());
    both_renew(&r, 5).await;
    assert_eq!(issuers_since(&r, &a, &b), ["first"]);

    // A new intermediate whose files nobody may read (a Secret with
    // `defaultMode: 0000`): refused, the previous CA signs; `chmod`, which
    // changes no size or modification time, is enough to have it taken.
    let refused = server.metric(&reloads("refused")).await;
    let now = ::time::OffsetDateTime::now_utc();
    let second = generate::intermediate(&root, &spec("second"), now).unwrap();
    let staged = tempfile::tempdir_in(dir.path().parent().unwrap()).unwrap();
    generate::write_istio_layout(staged.path(), &second, &second.cert_pem, &root.cert_pem).unwrap();
    for f in CA_FILES {
        chmod(&staged.path().join(f), 0o000);
        std::fs::rename(staged.path().join(f), dir.path().join(f)).unwrap();
    }
    eventually(
        "the unreadable bundle refused",
        Duration::from_secs(10),
        || async { server.metric(&reloads("refused")).await > refused },
    )
    .await;
    let (a, b) = (r.0.now(), r.1.now());
    both_renew(&r, 10).await;
    assert_eq!(issuers_since(&r, &a, &b), ["first"]);
    assert_eq!(ready(server.monitoring).await, 200);
    for f in CA_FILES {
        chmod(&dir.path().join(f), 0o600);
    }
    eventually(
        "the readable bundle taken",
        Duration::from_secs(15),
        || async { server.metric(&reloads("ok")).await >= 2.0 },
    )
    .await;
    let (a, b) = (r.0.now(), r.1.now());
    both_renew(&r, 5).await;
    assert_eq!(issuers_since(&r, &a, &b), ["second"]);
    finish_clean(r).await;
}

// --- the JWKS endpoint down, hung, slow --------------------------------------------

/// What the JWKS endpoint does with a request.
#[derive(Clone)]
enum Jwks {
    /// Answers at once with this document.
    Serve(String),
    /// Reads the request and never answers.
    Hang,
    /// Answers with this document after the delay.
    Slow(Duration, String),
}

/// An HTTPS JWKS endpoint on loopback that can be taken down (its port
/// closed: connections refused) and brought back on the same port.
struct JwksServer {
    port: u16,
    mode: Arc<Mutex<Jwks>>,
    acceptor: tokio_rustls::TlsAcceptor,
    accept_loop: Option<tokio::task::JoinHandle<()>>,
    requests: Arc<AtomicU64>,
}

impl JwksServer {
    async fn start(chain_pem: &str, key_pem: &str, mode: Jwks) -> JwksServer {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let chain = pki::parse_certificates_nonempty(chain_pem.as_bytes()).unwrap();
        let key = {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap()
        };
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let mut s = JwksServer {
            port: 0,
            mode: Arc::new(Mutex::new(mode)),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            accept_loop: None,
            requests: Arc::new(AtomicU64::new(0)),
        };
        s.up().await;
        s
    }

    fn set(&self, mode: Jwks) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Listens (again) on its port.
    async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        self.port = listener.local_addr().unwrap().port();
        let (acceptor, mode, requests) = (
            self.acceptor.clone(),
            self.mode.clone(),
            self.requests.clone(),
        );
        self.accept_loop = Some(tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, mode, requests) = (acceptor.clone(), mode.clone(), requests.clone());
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = vec![0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    requests.fetch_add(1, Ordering::SeqCst);
                    let mode = mode.lock().unwrap().clone();
                    let body = match mode {
                        Jwks::Serve(body) => body,
                        Jwks::Hang => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        }
                        Jwks::Slow(delay, body) => {
                            tokio::time::sleep(delay).await;
                            body
                        }
                    };
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                         connection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(response.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        }));
    }

    /// Closes the port: new connections are refused.
    async fn down(&mut self) {
        if let Some(task) = self.accept_loop.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

/// Both issuers' keys in one JWKS document.
fn jwks_of(issuers: &[&DevTokenIssuer]) -> String {
    let keys: Vec<serde_json::Value> = issuers
        .iter()
        .flat_map(|i| {
            let doc: serde_json::Value = serde_json::from_str(i.jwks()).unwrap();
            doc["keys"].as_array().unwrap().clone()
        })
        .collect();
    serde_json::json!({ "keys": keys }).to_string()
}

/// A plug-in CA whose serving certificate for `localhost` also serves the
/// JWKS endpoint, and a meshsign trusting the tokens of the issuer whose
/// keys that endpoint serves (refreshed every 10 s, the shortest allowed).
struct JwksSetup {
    /// The server's state and CA directory.
    _dir: tempfile::TempDir,
    server: meshsign::server::RunningServer,
    ep: CaEndpoint,
    jwks: JwksServer,
    /// The issuer whose key is served from the start.
    old: DevTokenIssuer,
    /// The same issuer name with a new key (a key rotation at the issuer).
    new: DevTokenIssuer,
}

async fn jwks_setup() -> JwksSetup {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let (chain_pem, key_pem) = common::bundle_and_serving_cert(&bundle, "first");
    let old = DevTokenIssuer::load_or_create(&dir.path().join("old")).unwrap();
    let new = DevTokenIssuer::load_or_create(&dir.path().join("new")).unwrap();
    let jwks = JwksServer::start(&chain_pem, &key_pem, Jwks::Serve(jwks_of(&[&old]))).await;
    let yaml = format!(
        "listen: \"127.0.0.1:0\"\nmonitoring: {{ listen: \"127.0.0.1:0\" }}\nstate_dir: {state:?}\n\
         ca: {{ dir: {bundle:?} }}\nrate_limits: {{ per_caller: {{ per_second: 0 }} }}\n\
         authn:\n  jwt:\n    - issuer: meshsign-dev\n      \
         jwks_uri: \"https://localhost:{port}/openid/v1/jwks\"\n      jwks_ca_file: {root:?}\n      \
         jwks_refresh: 10s\n",
        state = dir.path().join("state").display().to_string(),
        bundle = bundle.display().to_string(),
        port = jwks.port,
        root = bundle.join("root-cert.pem").display().to_string(),
    );
    let config = Config::from_yaml(&yaml).unwrap();
    let server = meshsign::server::start(&config)
        .await
        .expect("server starts");
    let roots = pki::parse_certificates_nonempty(server.roots_pem.as_bytes()).unwrap();
    let ep = CaEndpoint {
        addr: format!("localhost:{}", server.local_addr.port()),
        server_name: None,
        roots,
        client_identity: None,
    };
    JwksSetup {
        _dir: dir,
        server,
        ep,
        jwks,
        old,
        new,
    }
}

fn mint(issuer: &DevTokenIssuer) -> String {
    issuer.mint(&TokenRequest::new("default", "web")).unwrap()
}

/// One token request: its code and how long it took.
async fn timed(ep: &CaEndpoint, wl: &Workload, token: &str) -> (Code, Duration) {
    let started = Instant::now();
    let code = match wl.obtain(ep, Some(token), 600).await {
        Ok(_) => Code::Ok,
        Err((code, _)) => code,
    };
    (code, started.elapsed())
}

/// Sends `token` every 500 ms until it is accepted; returns how long that took.
async fn until_accepted(ep: &CaEndpoint, wl: &Workload, token: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let (code, took) = timed(ep, wl, token).await;
        assert!(took < Duration::from_secs(2), "a request waited {took:?}");
        if code == Code::Ok {
            return started.elapsed();
        }
        assert_eq!(code, Code::Unauthenticated);
        assert!(
            started.elapsed() < within,
            "the new key was not picked up within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn jwks_endpoint_down_keeps_the_fetched_keys_and_new_keys_come_when_it_is_back() {
    let mut s = jwks_setup().await;
    let ep = s.ep.clone();
    let (old_token, new_token) = (mint(&s.old), mint(&s.new));
    let r = Renewals::start(
        ep.clone(),
        Arc::new(Workload::new("default", "web", WorkloadKeyType::EcdsaP256)),
        Some(old_token),
    );
    r.wait_more(&Tally::default(), 3).await;

    // The endpoint goes away. The issuer rotates its key meanwhile.
    s.jwks.down().await;
    s.jwks.set(Jwks::Serve(jwks_of(&[&s.old, &s.new])));
    let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    // A token under a key the server never fetched: refused as a bad
    // credential (and asks for a refresh, which fails), at once.
    let (code, took) = timed(&ep, &wl, &new_token).await;
    assert_eq!(code, Code::Unauthenticated);
    assert!(took < Duration::from_secs(2), "{took:?}");
    // Past a periodic refresh (10 s), which fails too: the keys fetched
    // before still verify.
    let before = r.now();
    tokio::time::sleep(Duration::from_secs(11)).await;
    r.wait_more(&before, 100).await;
    assert!(r.now().failed.is_empty(), "{:?}", r.now().failed);

    // Back, with the new key: picked up without a restart.
    s.jwks.up().await;
    let took = until_accepted(&ep, &wl, &new_token, Duration::from_secs(30)).await;
    eprintln!("new key accepted {took:?} after the endpoint came back");
    let t = r.finish().await;
    assert!(t.failed.is_empty(), "{t:?}");
    assert!(t.slowest < Duration::from_secs(2), "{t:?}");
    s.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn jwks_endpoint_hung_or_slow_never_holds_up_a_request_and_refresh_recovers() {
    let s = jwks_setup().await;
    let ep = s.ep.clone();
    let (old_token, new_token) = (mint(&s.old), mint(&s.new));
    let r = Renewals::start(
        ep.clone(),
        Arc::new(Workload::new("default", "web", WorkloadKeyType::EcdsaP256)),
        Some(old_token),
    );
    r.wait_more(&Tally::default(), 3).await;

    // The endpoint accepts connections and never answers.
    s.jwks.set(Jwks::Hang);
    let asked = s.jwks.requests.load(Ordering::SeqCst);
    let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    // The unknown key asks for a refresh, which now hangs: the request itself
    // is refused at once, and so is the next.
    for _ in 0..3 {
        let (code, took) = timed(&ep, &wl, &new_token).await;
        assert_eq!(code, Code::Unauthenticated);
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    eventually(
        "the refresh reached the hung endpoint",
        Duration::from_secs(5),
        || async { s.jwks.requests.load(Ordering::SeqCst) > asked },
    )
    .await;
    // Renewals with known keys go on while the refresh hangs.
    let before = r.now();
    r.wait_more(&before, 40).await;

    // The endpoint answers again, slowly (3 s), with the rotated keys: the
    // hung fetch ends at its 10 s deadline and a later refresh takes them.
    s.jwks.set(Jwks::Slow(
        Duration::from_secs(3),
        jwks_of(&[&s.old, &s.new]),
    ));
    let took = until_accepted(&ep, &wl, &new_token, Duration::from_secs(40)).await;
    eprintln!("new key accepted {took:?} after the endpoint answered again");
    let t = r.finish().await;
    assert!(t.failed.is_empty(), "{t:?}");
    assert!(t.slowest < Duration::from_secs(2), "{t:?}");
    s.server.shutdown().await.unwrap();
}

// --- the Kubernetes API server hung, down, back ---------------------------------------

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kube/apiserver.sh")
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill {pid} {sig}");
}

fn apiserver_pid(dir: &Path) -> i32 {
    std::fs::read_to_string(dir.join("apiserver.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Gone, or a zombie nobody reaps (the script's process is not our child).
fn exited(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit(')').next().unwrap().trim_start().starts_with('Z')
    })
}

/// Stops the other API server (and its etcd) when the test ends, however it ends.
struct StopOnDrop(PathBuf, Option<Child>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.0).status();
        if let Some(mut c) = self.1.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test]
async fn kubernetes_api_server_down_is_unavailable_for_new_tokens_and_recovers() {
    // An API server of its own: the shared one must stay up for the others.
    let Some(api) = KubeApiServer::start_another() else {
        return;
    };
    let mut guard = StopOnDrop(api.dir.clone(), None);
    let k = Kube::new(&api).await;
    k.namespace("bad-day", &[]).await;
    k.service_account("bad-day", "web").await;
    let uid = k.pod("bad-day", "web-1", "web", "node-1").await;
    let cached = k
        .token("bad-day", "web", "istio-ca", Some(("web-1", &uid)))
        .await;
    let fresh = k
        .token("bad-day", "web", "istio-ca", Some(("web-1", &uid)))
        .await;
    let ts = TestServer::dev(&format!(
        "kubernetes:\n  clusters:\n    - {{ id: Kubernetes, kubeconfig: {:?} }}\n  \
         token_review: {{ timeout: 2s, cache_ttl: 60s }}\n",
        api.kubeconfig.display().to_string()
    ))
    .await;
    let monitoring = ts.server.monitoring_addr.unwrap();
    let ep = ts.endpoint();
    let wl = Arc::new(Workload::new("bad-day", "web", WorkloadKeyType::EcdsaP256));
    let (_, issued) = wl.obtain(&ep, Some(&cached), 3600).await.expect("reviewed");
    let mtls = Renewals::start(
        CaEndpoint {
            client_identity: Some(wl.client_identity(&issued)),
            ..ep.clone()
        },
        wl.clone(),
        None,
    );
    // The cached token renews on: its review is reused for `cache_ttl`.
    let by_cached = Renewals::start(ep.clone(), wl.clone(), Some(cached));
    by_cached.wait_more(&Tally::default(), 3).await;
    mtls.wait_more(&Tally::default(), 3).await;
    let unavailable = "meshsign_token_reviews_total{cluster=\"Kubernetes\",result=\"unavailable\"}";
    let authenticated =
        "meshsign_token_reviews_total{cluster=\"Kubernetes\",result=\"authenticated\"}";
    assert_eq!(ts.metric(unavailable).await, 0.0);

    // Hung (stopped): a token not reviewed yet waits for the review's
    // deadline (2 s), then UNAVAILABLE, which agents retry.
    let pid = apiserver_pid(&api.dir);
    signal(pid, libc::SIGSTOP);
    let (code, took) = timed(&ep, &wl, &fresh).await;
    assert_eq!(code, Code::Unavailable);
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_eq!(ts.metric(unavailable).await, 1.0);

    // Down (killed: connections refused): UNAVAILABLE without waiting. Its
    // command line is kept to start it again as it was.
    let argv: Vec<String> =
        String::from_utf8(std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
            .unwrap()
            .split('\0')
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect();
    signal(pid, libc::SIGKILL);
    eventually("the API server gone", Duration::from_secs(10), || async {
        exited(pid)
    })
    .await;
    let (code, took) = timed(&ep, &wl, &fresh).await;
    assert_eq!(code, Code::Unavailable);
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(ts.metric(unavailable).await >= 2.0);
    // Meanwhile: mTLS and the cached token renew, the server stays ready.
    let (a, b) = (mtls.now(), by_cached.now());
    mtls.wait_more(&a, 10).await;
    by_cached.wait_more(&b, 10).await;
    assert_eq!(ready(monitoring).await, 200);
    let authenticated_before = ts.metric(authenticated).await;

    // Back on the same address, with the same keys and etcd (the same
    // command line): the token nothing could review is accepted, without a
    // restart of meshsign (outages are not cached).
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(api.dir.join("apiserver.log"))
        .unwrap();
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    std::fs::write(api.dir.join("apiserver.pid"), child.id().to_string()).unwrap();
    guard.1 = Some(child);
    let started = Instant::now();
    loop {
        let (code, took) = timed(&ep, &wl, &fresh).await;
        assert!(took < Duration::from_secs(4), "{took:?}");
        if code == Code::Ok {
            break;
        }
        assert_eq!(code, Code::Unavailable);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not accepted within 60 s of the API server's restart"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "accepted {:?} after the API server was started again",
        started.elapsed()
    );
    assert!(ts.metric(authenticated).await > authenticated_before);
    let (mtls, by_cached) = (mtls.finish().await, by_cached.finish().await);
    assert!(mtls.failed.is_empty(), "{mtls:?}");
    assert!(by_cached.failed.is_empty(), "{by_cached:?}");
    ts.server.shutdown().await.unwrap();
    drop(guard);
}

// --- the audit disk full: a real file system out of space ---------------------------------

/// A 1 MiB tmpfs mounted on a fresh directory, unmounted when dropped;
/// `None` where mounting is not permitted (not root, no CAP_SYS_ADMIN).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount() -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "meshsign-bad-day"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a filler file until the file system has no space left.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling: {e}"),
            }
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn audit_disk_really_full_refuses_issuance_and_recovers_when_space_returns() {
    let Some(disk) = SmallDisk::mount() else {
        // tests/audit.rs covers a full disk through the storage seam.
        eprintln!("SKIP: cannot mount a tmpfs here");
        return;
    };
    let audit = disk.path().join("audit");
    let ts = TestServer::dev(&format!(
        "audit: {{ dir: {:?}, on_failure: refuse }}\n",
        audit.display().to_string()
    ))
    .await;
    let ep = ts.endpoint();
    let token = ts.token("default", "web");
    let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    let mut issued = 0u64;
    for _ in 0..3 {
        wl.obtain(&ep, Some(&token), 3600).await.expect("issued");
        issued += 1;
    }

    // No space left. A record may still fit in the file's last page: issue
    // until one does not; from then on every issuance is refused with
    // UNAVAILABLE (agents retry it) and no certificate leaves without its record.
    let filler = disk.fill();
    let mut refused = 0;
    for _ in 0..40 {
        match wl.obtain(&ep, Some(&token), 3600).await {
            Ok(_) => issued += 1,
            Err((code, _)) => {
                assert_eq!(code, Code::Unavailable);
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
        }
    }
    assert_eq!(refused, 3, "a full disk did not stop issuance");
    assert_eq!(ts.metric("meshsign_audit_writer_healthy").await, 0.0);
    assert!(
        ts.metric("meshsign_audit_records_lost_total{reason=\"write_error\"}")
            .await
            >= 1.0
    );
    assert_eq!(
        ts.metric("citadel_server_success_cert_issuance_count")
            .await,
        issued as f64
    );
    // Refusals of bad credentials do not wait for the disk either.
    let (code, _, _) = common::send(&ep, wl.csr(), Some("not-a-jwt"), 3600).await;
    assert_eq!(code, Code::Unauthenticated);

    // Space again: the writer recovers by itself.
    std::fs::remove_file(filler).unwrap();
    eventually("writer healthy", Duration::from_secs(10), || async {
        ts.metric("meshsign_audit_writer_healthy").await == 1.0
    })
    .await;
    for _ in 0..3 {
        wl.obtain(&ep, Some(&token), 3600)
            .await
            .expect("issued again");
        issued += 1;
    }
    ts.server.audit().expect("audit on").flush().await;
    ts.server.shutdown().await.unwrap();

    // The trail on the real file system verifies and holds exactly the
    // certificates handed out, and says that records were lost.
    let report = meshsign::audit::verify(&[audit], &Default::default()).unwrap();
    assert!(report.is_intact(), "{report:#?}");
    assert_eq!(report.issued, issued, "{report:#?}");
    assert!(report.lost >= 1, "{report:#?}");
}
