//! Zero-downtime root rotation, end to end, with workloads renewing all the
//! time: old root → old + new roots → a new intermediate under the new root →
//! the old root removed. Workloads renew by token and by mTLS (the
//! certificate they hold), each on a new connection every time (trusting the
//! roots of their last answer, as istio-agent does) and one by token on a
//! connection held from the start. Not one renewal may fail.
//!
//! Besides: a connection whose client certificate was verified under the old
//! root loses that identity on its next request once the old root is gone,
//! and a server certificate under the new root is served once the new
//! intermediate is in use.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, TestServer, Workload};
use meshsign::ca::generate::{self, CaSpec, GeneratedCa, KeyType};
use meshsign::client::{self, CaEndpoint, CertificateRequest, IssuedCertificate, WorkloadKeyType};
use meshsign::pki;
use meshsign::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use rustls_pki_types::CertificateDer;
use tonic::transport::Channel;
use tonic::Code;

fn spec(cn: &str) -> CaSpec {
    common::ca_spec(cn, KeyType::EcdsaP256, ::time::Duration::days(30))
}

/// The DER of a generated CA's certificate.
fn der(ca: &GeneratedCa) -> CertificateDer<'static> {
    pki::parse_certificates_nonempty(ca.cert_pem.as_bytes())
        .unwrap()
        .remove(0)
}

/// What one renewing workload knows: the roots of its last answer and the
/// certificate it holds.
struct Known {
    roots: Vec<CertificateDer<'static>>,
    issued: IssuedCertificate,
}

/// A workload renewing in a loop, and its tally.
struct Renewer {
    name: &'static str,
    known: Mutex<Known>,
    ok: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Renewer {
    fn new(name: &'static str, issued: IssuedCertificate) -> Arc<Self> {
        let roots = pki::parse_certificates_nonempty(issued.root_pem.as_bytes()).unwrap();
        Arc::new(Renewer {
            name,
            known: Mutex::new(Known { roots, issued }),
            ok: AtomicU64::new(0),
            failures: Mutex::new(Vec::new()),
        })
    }

    fn record(&self, outcome: Result<IssuedCertificate, (Code, String)>) {
        match outcome {
            Ok(issued) => {
                let roots = pki::parse_certificates_nonempty(issued.root_pem.as_bytes()).unwrap();
                *self.known.lock().unwrap() = Known { roots, issued };
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((code, message)) => self
                .failures
                .lock()
                .unwrap()
                .push(format!("{}: {code:?} {message}", self.name)),
        }
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.known.lock().unwrap().roots.clone()
    }

    fn holds_issuer(&self, issuer: &GeneratedCa) -> bool {
        let known = self.known.lock().unwrap();
        let leaf = pki::parse_cert(&known.issued.leaf).unwrap();
        let issuer = der(issuer);
        let ca = pki::parse_cert(&issuer).unwrap();
        leaf.issuer().as_raw() == ca.subject().as_raw()
    }

    fn trusts(&self, root: &GeneratedCa) -> bool {
        self.roots().contains(&der(root))
    }

    fn only_trusts(&self, root: &GeneratedCa) -> bool {
        let roots = self.roots();
        roots == [der(root)]
    }

    /// Successful renewals so far.
    fn count(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }
}

/// How a renewer asks.
#[derive(Clone, Copy)]
enum Mode {
    /// A new connection every time, authenticated by token.
    TokenFresh,
    /// A new connection every time, authenticated by the certificate held.
    MtlsFresh,
    /// One connection kept from the start, authenticated by token.
    TokenHeld,
}

async fn renew_loop(
    renewer: Arc<Renewer>,
    mode: Mode,
    addr: String,
    token: String,
    wl: Arc<Workload>,
    stop: Arc<AtomicBool>,
) {
    let endpoint = |client_identity| CaEndpoint {
        addr: addr.clone(),
        server_name: None,
        roots: renewer.roots(),
        client_identity,
    };
    let mut held = match mode {
        Mode::TokenHeld => Some(client::connect(&endpoint(None)).await.expect("connect")),
        _ => None,
    };
    while !stop.load(Ordering::Relaxed) {
        let outcome = match mode {
            Mode::TokenFresh => wl
                .obtain(&endpoint(None), Some(&token), 600)
                .await
                .map(|(_, issued)| issued),
            Mode::MtlsFresh => {
                let identity = {
                    let known = renewer.known.lock().unwrap();
                    wl.client_identity(&known.issued)
                };
                wl.obtain(&endpoint(Some(identity)), None, 600)
                    .await
                    .map(|(_, issued)| issued)
            }
            Mode::TokenHeld => {
                let ca = held.as_mut().expect("held connection");
                ask(ca, &wl, Some(&token)).await
            }
        };
        renewer.record(outcome);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// One request on an existing connection, its answer verified.
async fn ask(
    ca: &mut IstioCertificateServiceClient<Channel>,
    wl: &Workload,
    token: Option<&str>,
) -> Result<IssuedCertificate, (Code, String)> {
    let elements = client::create_certificate(
        ca,
        &CertificateRequest {
            csr_pem: wl.csr(),
            ttl_seconds: 600,
            token,
            cluster_id: "Kubernetes",
            impersonate: None,
        },
    )
    .await
    .map_err(|s| (s.code(), s.message().to_owned()))?;
    client::verify_response(
        &elements,
        &wl.key,
        &wl.id,
        ::time::OffsetDateTime::now_utc(),
    )
    .map_err(|e| (Code::Internal, e))
}

/// Waits until every renewer satisfies `done` and has renewed at least
/// twice more since (so the step was lived through, not only reached).
async fn settle(renewers: &[Arc<Renewer>], what: &str, done: impl Fn(&Renewer) -> bool) {
    eventually(what, Duration::from_secs(20), || async {
        renewers.iter().all(|r| done(r))
    })
    .await;
    let marks: Vec<u64> = renewers.iter().map(|r| r.count()).collect();
    eventually(
        &format!("{what}: renewals continue"),
        Duration::from_secs(20),
        || async {
            renewers
                .iter()
                .zip(&marks)
                .all(|(r, mark)| r.count() >= mark + 2)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn root_rotation_with_continuous_renewals_has_no_failures() {
    let dir = tempfile::tempdir().unwrap();
    let now = ::time::OffsetDateTime::now_utc();
    let old_root = generate::root(&spec("old root"), now).unwrap();
    let old_int = generate::intermediate(&old_root, &spec("old intermediate"), now).unwrap();
    generate::write_istio_layout(dir.path(), &old_int, &old_int.cert_pem, &old_root.cert_pem)
        .unwrap();
    let new_root = generate::root(&spec("new root"), now).unwrap();
    let new_int = generate::intermediate(&new_root, &spec("new intermediate"), now).unwrap();

    let ts = TestServer::with_ca_dir_and_reload(dir.path(), "1s").await;
    let token = ts.token("default", "web");
    let wl = Arc::new(Workload::new("default", "web", WorkloadKeyType::EcdsaP256));
    let (_, first) = wl
        .obtain(&ts.endpoint(), Some(&token), 600)
        .await
        .expect("first certificate");

    // A connection authenticated by a certificate under the old root, held
    // through the rotation.
    let mut held_mtls = client::connect(&CaEndpoint {
        client_identity: Some(wl.client_identity(&first)),
        ..ts.endpoint()
    })
    .await
    .expect("mTLS connection");
    ask(&mut held_mtls, &wl, None)
        .await
        .expect("renewal by the certificate held");

    let stop = Arc::new(AtomicBool::new(false));
    let renewers = [
        (
            Renewer::new("token, new connections", first.clone()),
            Mode::TokenFresh,
        ),
        (
            Renewer::new("mTLS, new connections", first.clone()),
            Mode::MtlsFresh,
        ),
        (
            Renewer::new("token, held connection", first.clone()),
            Mode::TokenHeld,
        ),
    ];
    let mut tasks = Vec::new();
    for (renewer, mode) in &renewers {
        tasks.push(tokio::spawn(renew_loop(
            renewer.clone(),
            *mode,
            ts.addr(),
            token.clone(),
            wl.clone(),
            stop.clone(),
        )));
    }
    let all: Vec<Arc<Renewer>> = renewers.iter().map(|(r, _)| r.clone()).collect();
    settle(&all, "start", |_| true).await;

    // Step 1: both roots trusted; the old intermediate still signs.
    let both = format!("{}{}", old_root.cert_pem, new_root.cert_pem);
    generate::write_file(&dir.path().join("root-cert.pem"), &both, false).unwrap();
    settle(&all, "step 1: combined roots reach every workload", |r| {
        r.trusts(&new_root) && r.trusts(&old_root)
    })
    .await;
    ask(&mut held_mtls, &wl, None)
        .await
        .expect("step 1: a certificate under the old root still authenticates");

    // Step 2: a new intermediate under the new root.
    generate::write_istio_layout(dir.path(), &new_int, &new_int.cert_pem, &both).unwrap();
    settle(
        &all,
        "step 2: certificates from the new intermediate",
        |r| r.holds_issuer(&new_int),
    )
    .await;
    // The serving certificate follows: a client that trusts only the new
    // root can connect.
    let new_only = CaEndpoint {
        roots: vec![der(&new_root)],
        ..ts.endpoint()
    };
    eventually(
        "serving certificate under the new root",
        Duration::from_secs(10),
        || async { wl.obtain(&new_only, Some(&token), 600).await.is_ok() },
    )
    .await;
    ask(&mut held_mtls, &wl, None)
        .await
        .expect("step 2: a certificate under the old root still authenticates");

    // Step 3: the old root removed.
    generate::write_file(&dir.path().join("root-cert.pem"), &new_root.cert_pem, false).unwrap();
    settle(&all, "step 3: only the new root", |r| {
        r.only_trusts(&new_root)
    })
    .await;
    // The connection whose certificate chains to the removed root loses
    // that identity on its next request.
    let refused = ask(&mut held_mtls, &wl, None).await;
    assert!(
        matches!(refused, Err((Code::Unauthenticated, _))),
        "old-root client certificate still accepted: {refused:?}"
    );
    // A new connection with that certificate fails its handshake; with the
    // certificate renewed under the new root it succeeds.
    let old_identity = CaEndpoint {
        roots: vec![der(&new_root)],
        client_identity: Some(wl.client_identity(&first)),
        ..ts.endpoint()
    };
    assert!(wl.obtain(&old_identity, None, 600).await.is_err());
    let current = renewers[1].0.known.lock().unwrap().issued.clone();
    let renewed = CaEndpoint {
        roots: vec![der(&new_root)],
        client_identity: Some(wl.client_identity(&current)),
        ..ts.endpoint()
    };
    wl.obtain(&renewed, None, 600)
        .await
        .expect("a certificate under the new root authenticates");

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let failures: Vec<String> = all
        .iter()
        .flat_map(|r| r.failures.lock().unwrap().clone())
        .collect();
    let total: u64 = all.iter().map(|r| r.count()).sum();
    assert!(
        failures.is_empty(),
        "{} of {} renewals failed: {failures:#?}",
        failures.len(),
        total + failures.len() as u64
    );
    assert!(total >= 30, "only {total} renewals");
    eprintln!(
        "root rotation: {total} renewals ({}), none failed",
        all.iter()
            .map(|r| format!("{}: {}", r.name, r.count()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    ts.server.shutdown().await.unwrap();
}

/// Root changes that would strand workloads are refused, naming the file,
/// and the running CA keeps signing; the steps of a rotation are taken.
#[tokio::test]
async fn only_safe_root_changes_are_taken() {
    use meshsign::ca::reload::{reload, roots_delta, ReloadError};
    use meshsign::ca::rotation::StepError;
    let now = ::time::OffsetDateTime::now_utc();
    let a = generate::root(&spec("root A"), now).unwrap();
    let b = generate::root(&spec("root B"), now).unwrap();
    let c = generate::root(&spec("root C"), now).unwrap();
    let under_a = generate::intermediate(&a, &spec("under A"), now).unwrap();
    let under_b = generate::intermediate(&b, &spec("under B"), now).unwrap();
    let dir = |signing: &GeneratedCa, roots: &[&GeneratedCa]| {
        let d = tempfile::tempdir().unwrap();
        let roots: String = roots.iter().map(|r| r.cert_pem.as_str()).collect();
        generate::write_istio_layout(d.path(), signing, &signing.cert_pem, &roots).unwrap();
        d
    };
    let load = |d: &tempfile::TempDir| meshsign::ca::Ca::load(d.path(), now).unwrap();

    let start = dir(&under_a, &[&a]);
    let ca_a = load(&start);
    // B replacing A: refused.
    let d = dir(&under_b, &[&b]);
    match reload(d.path(), &ca_a, now) {
        Err(ReloadError::Step(StepError::RootsNotNested { file })) => {
            assert_eq!(file, d.path().join("root-cert.pem"))
        }
        other => panic!("expected RootsNotNested, got {other:?}"),
    }
    // B added and an intermediate under B at once: workloads do not trust B yet.
    let d = dir(&under_b, &[&a, &b]);
    match reload(d.path(), &ca_a, now) {
        Err(ReloadError::Step(StepError::SignerUnderUntrustedRoot { file, .. })) => {
            assert_eq!(file, d.path().join("ca-cert.pem"))
        }
        other => panic!("expected SignerUnderUntrustedRoot, got {other:?}"),
    }
    // The rotation's steps.
    let step1 = reload(dir(&under_a, &[&a, &b]).path(), &ca_a, now).expect("step 1");
    assert_eq!(roots_delta(&ca_a, &step1), (1, 0));
    let step2 = reload(dir(&under_b, &[&a, &b]).path(), &step1, now).expect("step 2");
    assert_eq!(roots_delta(&step1, &step2), (0, 0));
    // {A, B} -> {B, C}: one root in common, but neither contains the other.
    let d = dir(&under_b, &[&b, &c]);
    assert!(matches!(
        reload(d.path(), &step2, now),
        Err(ReloadError::Step(StepError::RootsNotNested { .. }))
    ));
    // Removing B while the intermediate is under B is refused by the
    // bundle checks themselves (no path to a root).
    assert!(matches!(
        reload(dir(&under_b, &[&a]).path(), &step2, now),
        Err(ReloadError::Bundle(_))
    ));
    // Moving the intermediate and removing the old root in one step: the
    // certificates the old intermediate issued would be stranded.
    assert!(matches!(
        reload(dir(&under_b, &[&b]).path(), &step1, now),
        Err(ReloadError::Step(StepError::RemovesRootInUse { .. }))
    ));
    let step3 = reload(dir(&under_b, &[&b]).path(), &step2, now).expect("step 3");
    assert_eq!(roots_delta(&step2, &step3), (0, 1));
}

/// The CLI stages a rotation for two clusters; `ca check` places each
/// staged directory at its step; `ca intermediate` issues under the new root.
#[test]
fn cli_stages_a_rotation_and_ca_check_explains_each_step() {
    let bin = env!("CARGO_BIN_EXE_meshsign");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "meshsign {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let t = tempfile::tempdir().unwrap();
    let p = |s: &str| t.path().join(s).display().to_string();
    run(&[
        "ca",
        "init",
        "--out",
        &p("certs"),
        "--clusters",
        "east,west",
    ]);
    assert!(run(&["ca", "check", &p("certs/east")]).contains("rotation: not rotating"));
    run(&[
        "ca",
        "rotate-root",
        "--current",
        &p("certs/east"),
        "--current",
        &p("certs/west"),
        "--out",
        &p("rot"),
    ]);
    for cluster in ["east", "west"] {
        for (stage, says) in [
            ("step-2-both-roots", "step 2 of 4"),
            ("step-3-new-intermediate", "step 3 of 4"),
            ("step-4-new-root-only", "rotation: not rotating"),
        ] {
            let out = run(&["ca", "check", &p(&format!("rot/{stage}/{cluster}"))]);
            assert!(out.contains(says), "{stage}/{cluster}: {out}");
        }
    }
    // Both clusters' new intermediates are under the one new root.
    let new_root = std::fs::read_to_string(t.path().join("rot/new-root/root-cert.pem")).unwrap();
    for cluster in ["east", "west"] {
        let roots = std::fs::read_to_string(
            t.path()
                .join(format!("rot/step-4-new-root-only/{cluster}/root-cert.pem")),
        )
        .unwrap();
        assert_eq!(roots, new_root);
    }
    run(&[
        "ca",
        "intermediate",
        "--root",
        &p("rot/new-root"),
        "--out",
        &p("north"),
        "--cluster",
        "north",
    ]);
    assert!(run(&["ca", "check", &p("north")]).contains("OK: test signing verified"));
    // A second rotation into the same place is refused.
    let again = std::process::Command::new(bin)
        .args([
            "ca",
            "rotate-root",
            "--current",
            &p("certs/east"),
            "--out",
            &p("rot"),
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
}
