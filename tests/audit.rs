//! The audit trail against a real server on loopback: one record per
//! decision with the right fields, `audit verify` passing on an intact trail
//! and naming the place of each kind of tampering, rotation by size and
//! retention, a restart continuing the chain, a full disk under both
//! `on_failure` settings (through the storage seam), the budget for
//! unauthenticated refusals, and no token ever reaching the trail.

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, send, TestServer, Workload};
use meshsign::audit::record::{hex, line_hash, parse_file_name};
use meshsign::audit::verify::{Anchor, Problem};
use meshsign::audit::{verify, AuditFile, AuditStorage, FileSystem, VerifyOptions, VerifyReport};
use meshsign::client::{CaEndpoint, WorkloadKeyType};
use meshsign::config::Config;
use meshsign::server::{self, StartOptions};
use meshsign::token::{DevTokenIssuer, TokenRequest};
use serde_json::Value;
use tonic::Code;

fn audit_dir(ts: &TestServer) -> PathBuf {
    ts.dir.path().join("state").join("audit")
}

async fn flush(ts: &TestServer) {
    ts.server.audit().expect("audit on").flush().await;
}

/// The audit files of `dir`, in index order.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| parse_file_name(&e.file_name().to_string_lossy()).map(|i| (i, e.path())))
        .collect();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

/// Every record of the trail, in order.
fn records(dir: &Path) -> Vec<Value> {
    files(dir)
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn decisions(dir: &Path) -> Vec<Value> {
    records(dir)
        .into_iter()
        .filter(|r| r["kind"] == "decision")
        .collect()
}

fn check(dir: &Path, options: &VerifyOptions) -> VerifyReport {
    verify(&[dir.to_owned()], options).expect("verify runs")
}

fn intact(dir: &Path) -> VerifyReport {
    let report = check(dir, &VerifyOptions::default());
    assert!(
        report.is_intact(),
        "{:#?}",
        report
            .problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    );
    report
}

/// The first problem, which must name `file` (its name) and `line`.
fn first_problem(report: &VerifyReport) -> &Problem {
    report
        .problems
        .first()
        .unwrap_or_else(|| panic!("tampering not detected: {report:#?}"))
}

fn assert_names(report: &VerifyReport, file: &Path, line: Option<u64>, words: &str) {
    let p = first_problem(report);
    let all: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(p.file.file_name(), file.file_name(), "{all:#?}");
    assert_eq!(p.line, line, "{all:#?}");
    assert!(p.message.contains(words), "{all:#?}");
}

fn rfc3339(s: &Value) -> String {
    s.as_str().expect("a time string").to_owned()
}

#[tokio::test]
async fn every_decision_is_recorded_with_its_fields_and_the_trail_verifies() {
    let ts = TestServer::dev(
        "audit: {}\nrate_limits: { per_caller: { per_second: 0.001, burst: 2 } }\n",
    )
    .await;
    let ep = ts.endpoint();
    let token = ts.token("default", "web");

    // Issued, with a token.
    let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    let (_, issued) = wl.obtain(&ep, Some(&token), 3600).await.expect("issued");
    // Issued, renewing with the client certificate.
    let mtls = CaEndpoint {
        client_identity: Some(wl.client_identity(&issued)),
        ..ts.endpoint()
    };
    wl.obtain(&mtls, None, 3600)
        .await
        .expect("renewed over mTLS");
    // Refused: a token the server does not trust (unauthenticated).
    let stranger = DevTokenIssuer::load_or_create(&ts.dir.path().join("elsewhere")).unwrap();
    let foreign = stranger.mint(&TokenRequest::new("default", "web")).unwrap();
    let (code, _, _) = send(&ep, wl.csr(), Some(&foreign), 3600).await;
    assert_eq!(code, Code::Unauthenticated);
    // Refused by policy: the CSR asks for another identity.
    let admin = Workload::new("default", "admin", WorkloadKeyType::EcdsaP256);
    let (code, _, _) = send(&ep, admin.csr(), Some(&token), 3600).await;
    assert_eq!(code, Code::PermissionDenied);
    // Refused by the per-caller rate limit: the token's budget (burst 2) went
    // on the first request and the refused one (the mTLS renewal is another
    // caller instance).
    let (code, _, _) = send(&ep, wl.csr(), Some(&token), 3600).await;
    assert_eq!(code, Code::ResourceExhausted);
    flush(&ts).await;

    let dir = audit_dir(&ts);
    let d = decisions(&dir);
    assert_eq!(d.len(), 5, "{d:#?}");
    let web = "spiffe://cluster.local/ns/default/sa/web";

    let first = &d[0];
    assert_eq!(first["outcome"], "issued");
    assert_eq!(first["code"], "OK");
    assert_eq!(first["reason"], Value::Null);
    assert_eq!(first["caller"], web);
    assert_eq!(first["requested"], web);
    assert_eq!(first["impersonated"], false);
    assert_eq!(first["auth"]["method"], "jwt");
    assert_eq!(first["auth"]["issuer"], "meshsign-dev");
    assert!(first["pod"]["name"].is_string(), "{first}");
    assert!(
        first["remote"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{first}"
    );
    let cert = &first["certificate"];
    assert_eq!(cert["serial"], issued.serial_hex.replace(':', ""));
    assert_eq!(cert["sha256"], hex(&line_hash(issued.leaf.as_ref())));
    let t = |odt: time::OffsetDateTime| {
        odt.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    assert_eq!(rfc3339(&cert["not_before"]), t(issued.not_before));
    assert_eq!(rfc3339(&cert["not_after"]), t(issued.not_after));
    let time = rfc3339(&first["time"]);
    assert!(
        time.len() == 27 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "{time}"
    );

    assert_eq!(d[1]["outcome"], "issued");
    assert_eq!(d[1]["auth"]["method"], "client_certificate");
    assert_eq!(d[1]["caller"], web);

    let unauth = &d[2];
    assert_eq!(unauth["outcome"], "refused");
    assert_eq!(unauth["code"], "UNAUTHENTICATED");
    assert_eq!(unauth["caller"], Value::Null);
    assert_eq!(unauth["auth"], Value::Null);
    assert!(
        unauth["reason"]
            .as_str()
            .unwrap()
            .contains("authentication failed"),
        "{unauth}"
    );
    assert!(unauth.get("certificate").is_none());

    let denied = &d[3];
    assert_eq!(denied["code"], "PERMISSION_DENIED");
    assert_eq!(denied["caller"], web);
    assert_eq!(
        denied["requested"],
        "spiffe://cluster.local/ns/default/sa/admin"
    );

    let limited = &d[4];
    assert_eq!(limited["code"], "RESOURCE_EXHAUSTED");
    assert_eq!(limited["caller"], web);
    assert!(
        limited["reason"].as_str().unwrap().contains("per_caller"),
        "{limited}"
    );

    // The chain: sequence numbers from 0, each record hashing its predecessor.
    let all = records(&dir);
    assert_eq!(all[0]["kind"], "file");
    assert_eq!(all[0]["prev"], "0".repeat(64));
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r["seq"], i as u64);
    }
    let report = intact(&dir);
    assert_eq!((report.issued, report.refused), (2, 3));
    assert_eq!(
        ts.metric("meshsign_audit_records_written_total").await,
        all.len() as f64
    );

    // The command line agrees, and exits 0.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshsign"))
        .args(["audit", "verify"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.starts_with("OK: 1 file(s), 6 records"), "{stdout}");
    ts.server.shutdown().await.unwrap();
}

/// A trail of several files to tamper with: `n` issued certificates,
/// files rotated at 2 KiB. Returns the (shut down) server's directory.
async fn sample_trail(n: usize) -> (tempfile::TempDir, PathBuf) {
    let ts = TestServer::dev("audit: { max_file_bytes: 2048 }\n").await;
    let ep = ts.endpoint();
    let token = ts.token("default", "web");
    let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    for _ in 0..n {
        wl.obtain(&ep, Some(&token), 3600).await.expect("issued");
    }
    let dir = audit_dir(&ts);
    let TestServer {
        server, dir: tmp, ..
    } = ts;
    server.shutdown().await.unwrap();
    (tmp, dir)
}

/// A copy of `src` to tamper with.
fn copy_of(src: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for f in files(src) {
        std::fs::copy(&f, to.path().join(f.file_name().unwrap())).unwrap();
    }
    to
}

fn lines_of(f: &Path) -> Vec<String> {
    std::fs::read_to_string(f)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(f: &Path, lines: &[String]) {
    std::fs::write(f, lines.join("\n") + "\n").unwrap();
}

#[tokio::test]
async fn verify_names_each_kind_of_tampering() {
    let (_keep, trail) = sample_trail(12).await;
    let report = intact(&trail);
    let names = files(&trail);
    assert!(names.len() >= 4, "not enough rotation: {names:?}");
    let last_seq = report.last_seq.unwrap();
    let anchor = Anchor {
        seq: last_seq,
        hash: report.last_hash.unwrap(),
    };
    // The second file (a middle one) is tampered with; it has a header and
    // at least two records.
    let second = |dir: &Path| files(dir)[1].clone();
    assert!(lines_of(&names[1]).len() >= 3);

    // Edited: a field of line 2 changes.
    let t = copy_of(&trail);
    let f = second(t.path());
    let mut l = lines_of(&f);
    l[1] = l[1].replace("\"code\":\"OK\"", "\"code\":\"INTERNAL\"");
    write_lines(&f, &l);
    let r = check(t.path(), &VerifyOptions::default());
    assert_names(&r, &f, Some(2), "altered");

    // Removed: line 2 disappears; the gap is between lines 1 and 2.
    let t = copy_of(&trail);
    let f = second(t.path());
    let mut l = lines_of(&f);
    let removed_seq = serde_json::from_str::<Value>(&l[1]).unwrap()["seq"].clone();
    l.remove(1);
    write_lines(&f, &l);
    let r = check(t.path(), &VerifyOptions::default());
    assert_names(
        &r,
        &f,
        Some(2),
        &format!("record seq {removed_seq} is missing"),
    );

    // Reordered: lines 2 and 3 swap.
    let t = copy_of(&trail);
    let f = second(t.path());
    let mut l = lines_of(&f);
    l.swap(1, 2);
    write_lines(&f, &l);
    let r = check(t.path(), &VerifyOptions::default());
    assert_names(&r, &f, Some(3), "reordered");
    assert_eq!(r.problems.len(), 1, "{:#?}", r.problems);

    // Inserted: a forged record after line 2, with that line's hash as its
    // `prev` and the next sequence number, i.e. correct for itself only.
    let t = copy_of(&trail);
    let f = second(t.path());
    let mut l = lines_of(&f);
    let mut forged: Value = serde_json::from_str(&l[2]).unwrap();
    forged["prev"] = Value::String(hex(&line_hash(l[1].as_bytes())));
    forged["requested"] = Value::String("spiffe://cluster.local/ns/kube-system/sa/admin".into());
    l.insert(2, serde_json::to_string(&forged).unwrap());
    write_lines(&f, &l);
    let r = check(t.path(), &VerifyOptions::default());
    assert_names(&r, &f, Some(3), "inserted");

    // A middle file removed.
    let t = copy_of(&trail);
    std::fs::remove_file(second(t.path())).unwrap();
    let r = check(t.path(), &VerifyOptions::default());
    assert_names(
        &r,
        &files(t.path())[1],
        None,
        "audit-00000002.jsonl missing",
    );

    // Two files swapped by renaming.
    let t = copy_of(&trail);
    let (a, b) = (files(t.path())[1].clone(), files(t.path())[2].clone());
    let tmp = t.path().join("x");
    std::fs::rename(&a, &tmp).unwrap();
    std::fs::rename(&b, &a).unwrap();
    std::fs::rename(&tmp, &b).unwrap();
    let r = check(t.path(), &VerifyOptions::default());
    assert_names(&r, &a, Some(1), "renamed or reordered");

    // The oldest file removed: the trail does not begin at its start.
    let t = copy_of(&trail);
    std::fs::remove_file(&files(t.path())[0]).unwrap();
    let r = check(t.path(), &VerifyOptions::default());
    assert_names(&r, &files(t.path())[0], Some(1), "does not begin here");
    let allowed = VerifyOptions {
        allow_missing_start: true,
        ..VerifyOptions::default()
    };
    assert!(check(t.path(), &allowed).is_intact());

    // A closed file shortened by its last line: the next header knew its length.
    let t = copy_of(&trail);
    let f = second(t.path());
    let mut l = lines_of(&f);
    l.pop();
    write_lines(&f, &l);
    let r = check(t.path(), &VerifyOptions::default());
    assert_names(&r, &f, None, "shorter");

    // The newest record cut in half.
    let t = copy_of(&trail);
    let newest = files(t.path()).last().unwrap().clone();
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() - 40]).unwrap();
    let r = check(t.path(), &VerifyOptions::default());
    assert_names(
        &r,
        &newest,
        Some(lines_of(&newest).len() as u64),
        "incomplete",
    );

    // The newest record removed at a line boundary: consistent in itself,
    // so only the anchor (logged by the server) catches it.
    let t = copy_of(&trail);
    let newest = files(t.path()).last().unwrap().clone();
    let mut l = lines_of(&newest);
    l.pop();
    write_lines(&newest, &l);
    assert!(check(t.path(), &VerifyOptions::default()).is_intact());
    let anchored = VerifyOptions {
        anchors: vec![anchor],
        ..VerifyOptions::default()
    };
    let r = check(t.path(), &anchored);
    assert_names(
        &r,
        &newest,
        Some(l.len() as u64),
        "newest records were removed",
    );
    assert!(check(&trail, &anchored).is_intact());

    // The command line exits non-zero and prints the place.
    let t = copy_of(&trail);
    let f = second(t.path());
    let mut l = lines_of(&f);
    l.remove(1);
    write_lines(&f, &l);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshsign"))
        .args(["audit", "verify"])
        .arg(t.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("BROKEN: {}:2 ", f.display())),
        "{stdout}"
    );
    // Files can be given one by one too.
    let mut given = files(&trail);
    given.reverse();
    assert!(verify(&given, &VerifyOptions::default())
        .unwrap()
        .is_intact());
}

#[tokio::test]
async fn files_rotate_by_size_keep_max_files_and_a_restart_continues_the_chain() {
    let ts = TestServer::dev("audit: { max_file_bytes: 1500, max_files: 3 }\n").await;
    let ep = ts.endpoint();
    let token = ts.token("default", "web");
    let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    for _ in 0..12 {
        wl.obtain(&ep, Some(&token), 3600).await.expect("issued");
    }
    flush(&ts).await;
    let dir = audit_dir(&ts);
    let names = files(&dir);
    assert_eq!(names.len(), 3, "{names:?}");
    for f in &names {
        let len = std::fs::metadata(f).unwrap().len();
        let lines = lines_of(f);
        assert!(
            len <= 1500 || lines.len() == 2,
            "{} is {len} bytes",
            f.display()
        );
        let header: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(header["kind"], "file");
        assert_eq!(
            header["file"],
            parse_file_name(&f.file_name().unwrap().to_string_lossy()).unwrap()
        );
    }
    // The oldest files went: verifiable only from where the trail now starts.
    assert!(!check(&dir, &VerifyOptions::default()).is_intact());
    let from_here = VerifyOptions {
        allow_missing_start: true,
        ..VerifyOptions::default()
    };
    assert!(check(&dir, &from_here).is_intact());
    let current = ts.metric("meshsign_audit_current_file").await;
    assert!(current >= 3.0, "{current}");

    // A restart with the same directory continues the chain in a new file.
    let state = ts.dir.path().join("state");
    let TestServer {
        server, dir: tmp, ..
    } = ts;
    server.shutdown().await.unwrap();
    let last_before = records(&dir).last().unwrap()["seq"].as_u64().unwrap();
    let config = Config::from_yaml(&format!(
        "listen: \"127.0.0.1:0\"\nstate_dir: {:?}\naudit: {{ max_file_bytes: 1500, max_files: 3 }}\n",
        state.display().to_string()
    ))
    .unwrap();
    let again = server::start(&config).await.unwrap();
    again.audit().unwrap().flush().await;
    let newest = files(&dir).last().unwrap().clone();
    let header: Value = serde_json::from_str(&lines_of(&newest)[0]).unwrap();
    assert_eq!(header["reason"], "start");
    assert_eq!(header["seq"], last_before + 1);
    // A second process cannot write to the same trail.
    let second = server::start(&Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..config.clone()
    })
    .await;
    assert!(
        second.is_err_and(|e| e.to_string().contains("in use by another")),
        "a second writer was allowed"
    );
    again.shutdown().await.unwrap();
    assert!(check(&dir, &from_here).is_intact());
    drop(tmp);
}

/// A disk that can be made full: writes then fail with ENOSPC after
/// writing half of their bytes, as a real full disk may.
#[derive(Debug, Default)]
struct FlakyDisk {
    full: Arc<AtomicBool>,
}

struct FlakyFile {
    inner: Box<dyn AuditFile>,
    full: Arc<AtomicBool>,
}

impl AuditStorage for FlakyDisk {
    fn create(&self, path: &Path) -> io::Result<Box<dyn AuditFile>> {
        Ok(Box::new(FlakyFile {
            inner: FileSystem.create(path)?,
            full: self.full.clone(),
        }))
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        FileSystem.sync_dir(dir)
    }
}

impl AuditFile for FlakyFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            self.inner.write_all(&bytes[..bytes.len() / 2])?;
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        self.inner.write_all(bytes)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.inner.sync()
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)
    }
}

/// A dev server whose audit files go through `storage`.
async fn with_storage(extra_yaml: &str, storage: Arc<dyn AuditStorage>) -> TestServer {
    TestServer::dev_with_options(
        extra_yaml,
        StartOptions {
            audit_storage: Some(storage),
        },
    )
    .await
}

#[tokio::test]
async fn a_full_disk_with_refuse_refuses_issuance_until_it_recovers() {
    let disk = FlakyDisk::default();
    let full = disk.full.clone();
    let ts = with_storage("audit: { on_failure: refuse }\n", Arc::new(disk)).await;
    let ep = ts.endpoint();
    let token = ts.token("default", "web");
    let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    wl.obtain(&ep, Some(&token), 3600).await.expect("issued");

    full.store(true, Ordering::SeqCst);
    // Signed, but its record could not be written: discarded, UNAVAILABLE.
    let (code, msg, _) = send(&ep, wl.csr(), Some(&token), 3600).await;
    assert_eq!(
        (code, msg.as_str()),
        (Code::Unavailable, "audit trail unavailable, retry later")
    );
    // While the writer is failing: refused before signing.
    let (code, _, _) = send(&ep, wl.csr(), Some(&token), 3600).await;
    assert_eq!(code, Code::Unavailable);
    assert_eq!(ts.metric("meshsign_audit_writer_healthy").await, 0.0);
    assert_eq!(
        ts.metric("citadel_server_success_cert_issuance_count")
            .await,
        1.0
    );
    assert!(
        ts.metric("meshsign_audit_records_lost_total{reason=\"write_error\"}")
            .await
            >= 1.0
    );

    // Space again: the writer recovers by itself within a tick or two.
    full.store(false, Ordering::SeqCst);
    eventually("writer healthy", Duration::from_secs(5), || async {
        ts.metric("meshsign_audit_writer_healthy").await == 1.0
    })
    .await;
    wl.obtain(&ep, Some(&token), 3600)
        .await
        .expect("issued again");
    flush(&ts).await;

    // The half-written batches were undone: the trail verifies, accounts for
    // what was lost, and holds exactly the certificates handed out.
    let dir = audit_dir(&ts);
    let report = intact(&dir);
    assert_eq!(report.issued, 2);
    assert!(report.lost >= 1, "{report:#?}");
    assert!(records(&dir).iter().any(
        |r| r["kind"] == "lost" && r["reasons"]["write_error"].as_u64().is_some_and(|n| n >= 1)
    ));
    ts.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_full_disk_with_count_issues_and_counts_the_loss() {
    let disk = FlakyDisk::default();
    let full = disk.full.clone();
    let ts = with_storage("audit: { on_failure: count }\n", Arc::new(disk)).await;
    let ep = ts.endpoint();
    let token = ts.token("default", "web");
    let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    wl.obtain(&ep, Some(&token), 3600).await.expect("issued");
    flush(&ts).await;

    full.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        wl.obtain(&ep, Some(&token), 3600)
            .await
            .expect("issued with the disk full");
    }
    flush(&ts).await;
    assert_eq!(
        ts.metric("meshsign_audit_records_lost_total{reason=\"write_error\"}")
            .await,
        3.0
    );
    assert_eq!(ts.metric("meshsign_audit_writer_healthy").await, 0.0);

    full.store(false, Ordering::SeqCst);
    eventually("writer healthy", Duration::from_secs(5), || async {
        ts.metric("meshsign_audit_writer_healthy").await == 1.0
    })
    .await;
    wl.obtain(&ep, Some(&token), 3600).await.expect("issued");
    flush(&ts).await;
    let dir = audit_dir(&ts);
    let report = intact(&dir);
    assert_eq!((report.issued, report.lost), (2, 3), "{report:#?}");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn unauthenticated_refusals_have_a_budget_and_the_excess_is_counted() {
    let ts = TestServer::dev("audit: { unauthenticated_refusals_per_second: 2 }\n").await;
    let ep = ts.endpoint();
    let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    let started = std::time::Instant::now();
    for _ in 0..10 {
        let (code, _, _) = send(&ep, wl.csr(), Some("not-a-token"), 3600).await;
        assert_eq!(code, Code::Unauthenticated);
    }
    // The budget is per wall-clock second: the flood may straddle a few.
    let seconds = started.elapsed().as_secs() + 2;
    // Authenticated refusals are never held back.
    let token = ts.token("default", "web");
    let admin = Workload::new("default", "admin", WorkloadKeyType::EcdsaP256);
    let (code, _, _) = send(&ep, admin.csr(), Some(&token), 3600).await;
    assert_eq!(code, Code::PermissionDenied);
    let over = ts
        .metric("meshsign_audit_records_lost_total{reason=\"over_budget\"}")
        .await;
    // The excess is written down within a tick.
    let dir = audit_dir(&ts);
    eventually("lost record", Duration::from_secs(5), || async {
        flush(&ts).await;
        records(&dir).iter().any(|r| r["kind"] == "lost")
    })
    .await;
    let d = decisions(&dir);
    let unauth = d.iter().filter(|r| r["caller"].is_null()).count();
    assert!(
        (2..=(2 * seconds as usize).min(10)).contains(&unauth),
        "{unauth} recorded in {seconds} s"
    );
    assert_eq!(unauth as f64 + over, 10.0);
    assert_eq!(
        d.iter()
            .filter(|r| r["code"] == "PERMISSION_DENIED")
            .count(),
        1
    );
    let report = intact(&dir);
    assert_eq!(report.lost as f64, over);
    ts.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn no_token_ever_reaches_the_trail() {
    let ts = TestServer::dev("audit: {}\n").await;
    let ep = ts.endpoint();
    let wl = Workload::new("default", "web", WorkloadKeyType::EcdsaP256);
    let good = ts.token("default", "web");
    let expired = ts.token_with(&TokenRequest {
        expired: true,
        ..TokenRequest::new("default", "web")
    });
    let wrong_audience = ts.token_with(&TokenRequest {
        audience: "somewhere-else",
        ..TokenRequest::new("default", "web")
    });
    let stranger = DevTokenIssuer::load_or_create(&ts.dir.path().join("elsewhere")).unwrap();
    let foreign = stranger.mint(&TokenRequest::new("default", "web")).unwrap();
    // A JWT whose signature part was swapped for another token's.
    let spliced = {
        let mut parts: Vec<&str> = good.split('.').collect();
        parts[2] = foreign.rsplit('.').next().unwrap();
        parts.join(".")
    };
    let garbage = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.bm90LWEtc2lnbmF0dXJl";
    let tokens = [
        &good,
        &expired,
        &wrong_audience,
        &foreign,
        &spliced,
        &garbage.to_owned(),
    ];
    for t in &tokens {
        let _ = send(&ep, wl.csr(), Some(t), 3600).await;
    }
    // And a CSR for another identity with a good token (a refusal after
    // authentication, whose record names the caller).
    let admin = Workload::new("default", "admin", WorkloadKeyType::EcdsaP256);
    let _ = send(&ep, admin.csr(), Some(&good), 3600).await;
    flush(&ts).await;

    let dir = audit_dir(&ts);
    assert_eq!(decisions(&dir).len(), tokens.len() + 1);
    let mut trail = String::new();
    for f in files(&dir) {
        trail.push_str(&std::fs::read_to_string(f).unwrap());
    }
    for t in &tokens {
        for (i, part) in t.split('.').enumerate() {
            // Every header is alike (`{"alg":…}`); payloads and signatures are not.
            if i > 0 && part.len() >= 8 {
                assert!(
                    !trail.contains(part),
                    "a token part reached the trail: {part}"
                );
            }
        }
        assert!(!trail.contains(t.as_str()));
    }
    assert!(!trail.contains("eyJ"), "something JWT-shaped in the trail");
    ts.server.shutdown().await.unwrap();
}
