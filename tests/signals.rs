//! The real binary as a process: `SIGTERM` while workloads renew as fast as
//! they can answers every call already in flight, stops taking new ones,
//! and exits 0 within the drain bound; `SIGHUP` reloads the configuration;
//! and the process is set up for its connections before it serves.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Workload;
use meshsign::client::{CaEndpoint, WorkloadKeyType};
use meshsign::token::{DevTokenIssuer, TokenRequest};

/// Starts `meshsign serve` in dev mode on a free loopback port; returns the
/// child and the port once it listens.
fn start(dir: &std::path::Path, extra_yaml: &str) -> (Child, u16) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = dir.join("meshsign.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: \"127.0.0.1:{port}\"\nstate_dir: {:?}\n{extra_yaml}",
            dir.join("state").display().to_string()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_meshsign"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(dir.join("server.log"))
        .map_or(true, |l| !l.contains("listening on"))
    {
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, port)
}

/// How clients reach the dev-mode server of `dir` on `port`.
fn endpoint(dir: &std::path::Path, port: u16) -> CaEndpoint {
    let roots = meshsign::pki::parse_certificates_nonempty(
        std::fs::read_to_string(dir.join("state/root-cert.pem"))
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    CaEndpoint {
        addr: format!("localhost:{port}"),
        server_name: None,
        roots,
        client_identity: None,
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not exit within {within:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_answers_calls_in_flight_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, port) = start(dir.path(), "limits: { drain_timeout: 5s }\n");
    let issuer = DevTokenIssuer::load_or_create(&dir.path().join("state")).unwrap();
    let token = issuer.mint(&TokenRequest::new("default", "web")).unwrap();
    let ep = endpoint(dir.path(), port);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    // (when the call started, its error) for every failed call.
    let failures: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (ep, token, stop, ok, failures) = (
            ep.clone(),
            token.clone(),
            stop.clone(),
            ok.clone(),
            failures.clone(),
        );
        clients.push(tokio::spawn(async move {
            let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
            let channel = meshsign::client::channel(&ep).await.unwrap();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                match wl.send_on(&channel, Some(&token)).await {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(code) => failures
                        .lock()
                        .unwrap()
                        .push((started, format!("{code:?}"))),
                }
            }
        }));
    }
    // Let the load run, then SIGTERM in the middle of it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = ok.load(Ordering::Relaxed);
    assert!(before > 50, "only {before} renewals before the signal");
    let signalled = Instant::now();
    // SAFETY: sending a signal to our own child process.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(15)))
            .await
            .unwrap();
    let exited = signalled.elapsed();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert!(status.success(), "exit status {status:?}");
    // Every call that started before the signal was answered with a
    // certificate; only calls made after it may fail (connection refused).
    let failures = failures.lock().unwrap();
    let early: Vec<&String> = failures
        .iter()
        .filter(|(started, _)| *started < signalled)
        .map(|(_, e)| e)
        .collect();
    assert!(
        early.is_empty(),
        "calls in flight at SIGTERM failed: {early:?}"
    );
    assert!(exited < Duration::from_secs(7), "exited after {exited:?}");
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.contains("shutting down"), "{log}");
}

/// One renewal for `ns`, on a new connection.
async fn renew(ep: &CaEndpoint, issuer: &DevTokenIssuer, ns: &str) -> tonic::Code {
    let wl = Workload::new(ns, "web", WorkloadKeyType::EcdsaP256);
    let token = issuer.mint(&TokenRequest::new(ns, "web")).unwrap();
    match wl.obtain(ep, Some(&token), 3600).await {
        Ok(_) => tonic::Code::Ok,
        Err((code, _)) => code,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file_and_a_bad_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, port) = start(dir.path(), "");
    let issuer = DevTokenIssuer::load_or_create(&dir.path().join("state")).unwrap();
    let ep = endpoint(dir.path(), port);
    let config = dir.path().join("meshsign.yaml");
    let original = std::fs::read_to_string(&config).unwrap();
    let hangup = |child: &Child| {
        // SAFETY: sending a signal to our own child process.
        assert_eq!(
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGHUP) },
            0
        );
    };
    assert_eq!(renew(&ep, &issuer, "blocked").await, tonic::Code::Ok);

    std::fs::write(
        &config,
        format!(
            "{original}policy: {{ deny: [ {{ namespace: blocked, service_account: \"*\" }} ] }}\n"
        ),
    )
    .unwrap();
    hangup(&child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while renew(&ep, &issuer, "blocked").await != tonic::Code::PermissionDenied {
        assert!(
            Instant::now() < deadline,
            "the reloaded policy was not applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(renew(&ep, &issuer, "open").await, tonic::Code::Ok);

    // A file that does not parse: the server keeps serving under the last good one.
    std::fs::write(&config, "policy: { deny: [\n").unwrap();
    hangup(&child);
    let log = dir.path().join("server.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("configuration not reloaded")
    {
        assert!(Instant::now() < deadline, "the bad file was not reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(child.try_wait().unwrap().is_none(), "the server exited");
    assert_eq!(
        renew(&ep, &issuer, "blocked").await,
        tonic::Code::PermissionDenied
    );
    assert_eq!(renew(&ep, &issuer, "open").await, tonic::Code::Ok);
    let _ = child.kill();
    let _ = child.wait();
}

/// The kernel grows a process's descriptor table by doubling, waiting for an
/// RCU grace period in the `accept4` that crosses each size (stalls of tens
/// of milliseconds measured under a connection flood); the server grows it
/// for `max_connections` before it serves.
#[test]
fn the_descriptor_table_is_sized_for_max_connections_before_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _port) = start(dir.path(), "limits: { max_connections: 5000 }\n");
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let fd_size: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))
        .expect("FDSize in /proc/PID/status")
        .trim()
        .parse()
        .unwrap();
    // 5,000 connections plus 1,024 other descriptors, rounded up by the kernel.
    assert!(fd_size >= 6024, "FDSize {fd_size}");
}
