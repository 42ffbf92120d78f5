//! What a new user meets first (issue 11, "What a new user tripped over"):
//! the listen defaults, the warning for a configuration no workload can get
//! a first certificate from, token files, the plug-in CA example outside
//! Kubernetes, and error and log messages a person reads.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshsign::config::{Config, DEV_LISTEN, PLUGIN_CA_LISTEN};

const BIN: &str = env!("CARGO_BIN_EXE_meshsign");

fn meshsign(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run meshsign")
}

fn succeed(args: &[&str]) -> String {
    let out = meshsign(args);
    assert!(
        out.status.success(),
        "meshsign {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn fail(args: &[&str]) -> String {
    let out = meshsign(args);
    assert!(!out.status.success(), "meshsign {args:?} succeeded");
    String::from_utf8(out.stderr).expect("utf-8")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn dev_mode_listens_on_loopback_and_a_plugin_ca_where_istiod_does() {
    assert_eq!(DEV_LISTEN, "127.0.0.1:15012");
    assert_eq!(PLUGIN_CA_LISTEN, "0.0.0.0:15012");
    // `meshsign serve` without a config, and a config without `listen`.
    assert_eq!(Config::dev_default().listen.to_string(), DEV_LISTEN);
    let dev = Config::from_yaml("trust_domain: cluster.local").unwrap();
    assert_eq!(dev.listen.to_string(), DEV_LISTEN);
    let plugin = Config::from_yaml("ca: { dir: /etc/cacerts }").unwrap();
    assert_eq!(plugin.listen.to_string(), PLUGIN_CA_LISTEN);
    // The file's `listen` always wins.
    let open_dev = Config::from_yaml("listen: \"0.0.0.0:15012\"").unwrap();
    assert_eq!(open_dev.listen.to_string(), "0.0.0.0:15012");
    let closed_plugin =
        Config::from_yaml("listen: \"127.0.0.1:9443\"\nca: { dir: /etc/cacerts }").unwrap();
    assert_eq!(closed_plugin.listen.to_string(), "127.0.0.1:9443");
}

#[test]
fn a_config_with_no_way_to_a_first_certificate_is_warned_about() {
    let only_client_certs = Config::from_yaml("ca: { dir: /etc/cacerts }").unwrap();
    let warnings = only_client_certs.startup_warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("no way to get a first certificate")
            && warnings[0].contains("only client certificates"),
        "{}",
        warnings[0]
    );

    // Each way to a first certificate silences it: dev mode, a JWT issuer,
    // a Kubernetes cluster.
    assert!(Config::dev_default().startup_warnings().is_empty());
    let jwt = Config::from_yaml(
        "ca: { dir: /etc/cacerts }\nauthn: { jwt: [ { issuer: x, jwks_file: /j.json } ] }",
    )
    .unwrap();
    assert!(jwt.startup_warnings().is_empty());
    let kube = Config::from_yaml(
        "ca: { dir: /etc/cacerts }\nkubernetes: { clusters: [ { id: c1, in_cluster: true } ] }",
    )
    .unwrap();
    assert!(kube.startup_warnings().is_empty());
}

#[test]
fn token_files_have_no_trailing_newline() {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    // `meshsign token > file`: stdout is not a terminal.
    let printed = succeed(&["token", "--state-dir", path(&state)]);
    assert_eq!(printed.split('.').count(), 3, "a JWT: {printed:?}");
    assert!(!printed.ends_with('\n'), "{printed:?}");
    assert_eq!(printed.trim(), printed);

    let file = t.path().join("istio-token");
    let quiet = succeed(&[
        "token",
        "--state-dir",
        path(&state),
        "--namespace",
        "ns1",
        "--out",
        path(&file),
    ]);
    assert_eq!(quiet, "", "nothing on stdout with --out");
    let written = std::fs::read_to_string(&file).unwrap();
    assert_eq!(written.split('.').count(), 3, "a JWT: {written:?}");
    assert_eq!(written.trim(), written, "no whitespace around the token");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
}

/// A `meshsign serve` child process, its stderr collected as it comes.
struct Serve {
    child: Child,
    log: Arc<Mutex<String>>,
    port: u16,
}

impl Serve {
    fn start(config: &Path) -> Serve {
        let mut child = Command::new(BIN)
            .args(["serve", "--config", path(config)])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn meshsign serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (stderr, sink) = (child.stderr.take().expect("stderr"), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut serve = Serve {
            child,
            log,
            port: 0,
        };
        let line = serve.wait_for("listening on");
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("address after 'listening on'");
        serve.port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        serve
    }

    /// The first log line containing `text`, waiting for it up to 20 s.
    fn wait_for(&mut self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = self.log.lock().unwrap().lines().find(|l| l.contains(text)) {
                return line.to_owned();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("meshsign serve exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {text:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ca init` into `dir`: returns the cluster directory.
fn plugin_bundle(dir: &Path) -> PathBuf {
    succeed(&["ca", "init", "--out", path(dir), "--clusters", "cluster1"]);
    dir.join("cluster1")
}

#[test]
fn serve_warns_when_no_workload_can_get_a_first_certificate() {
    let t = tempfile::tempdir().unwrap();
    let ca = plugin_bundle(&t.path().join("certs"));
    let config = t.path().join("meshsign.yaml");
    std::fs::write(
        &config,
        format!("listen: \"127.0.0.1:0\"\nca: {{ dir: {:?} }}\n", path(&ca)),
    )
    .unwrap();
    let mut serve = Serve::start(&config);
    let warning = serve.wait_for("no way to get a first certificate");
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("config/plugin-ca.yaml"), "{warning}");
}

/// config/plugin-ca.yaml as the README tells a user to run it: a bundle
/// from `ca init`, a token from a JWKS file, `request --token`. Also what a
/// person reads on the way: RFC 3339 times, no `Some(..)` in logs, each
/// cause once, and a hint when the roots given are another CA's.
#[test]
fn plugin_ca_example_issues_with_a_token_checked_against_a_jwks_file() {
    let t = tempfile::tempdir().unwrap();
    let certs = t.path().join("certs");
    let ca = plugin_bundle(&certs);
    let state = t.path().join("issuer");
    let token = t.path().join("istio-token");
    succeed(&[
        "token",
        "--state-dir",
        path(&state),
        "--issuer",
        "https://issuer.example.internal",
        "--namespace",
        "payments",
        "--service-account",
        "api",
        "--out",
        path(&token),
    ]);
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/plugin-ca.yaml"),
    )
    .unwrap();
    let jwks = state.join("jwks.json");
    let config_text = example
        .replace("\"certs/cluster1\"", &format!("{:?}", path(&ca)))
        .replace("\"/etc/meshsign/jwks.json\"", &format!("{:?}", path(&jwks)))
        .replace("\"0.0.0.0:15012\"", "\"127.0.0.1:0\"")
        .replace("\"127.0.0.1:15014\"", "\"127.0.0.1:0\"");
    assert_ne!(config_text, example);
    let config = t.path().join("plugin-ca.yaml");
    std::fs::write(&config, config_text).unwrap();
    let mut serve = Serve::start(&config);
    assert!(
        !serve.log().contains("no way to get a first certificate"),
        "{}",
        serve.log()
    );
    let addr = format!("localhost:{}", serve.port);
    let out = t.path().join("workload");
    let printed = succeed(&[
        "request",
        "--addr",
        &addr,
        "--root",
        path(&certs.join("root-cert.pem")),
        "--token",
        path(&token),
        "--namespace",
        "payments",
        "--service-account",
        "api",
        "--out",
        path(&out),
    ]);
    assert!(out.join("cert-chain.pem").exists());
    // `valid 2026-01-01T00:00:00Z .. 2026-01-02T00:02:00Z`
    let valid = printed
        .lines()
        .find(|l| l.trim_start().starts_with("valid "))
        .expect("validity line");
    assert!(is_rfc3339_range(valid), "{valid}");

    let issued = serve.wait_for("issued certificate");
    assert!(issued.contains(" remote=127.0.0.1:"), "{issued}");
    let loaded = serve.wait_for("CA bundle loaded");
    let expires = loaded
        .split("signer_expires=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("signer_expires");
    assert!(is_rfc3339(expires), "{loaded}");
    assert!(!serve.log().contains("Some("), "{}", serve.log());

    // Another CA's roots: named as such, the cause once.
    let other = plugin_bundle(&t.path().join("other"));
    let wrong = fail(&[
        "request",
        "--addr",
        &addr,
        "--root",
        path(&other.join("root-cert.pem")),
        "--token",
        path(&token),
    ]);
    assert!(wrong.contains("different CA than those roots"), "{wrong}");
    // (BadSignature: `ca init` names every root alike, so it is the same
    // name with another key.)
    assert_eq!(
        wrong.matches("invalid peer certificate").count(),
        1,
        "{wrong}"
    );
}

#[test]
fn a_refused_connection_is_reported_once() {
    let t = tempfile::tempdir().unwrap();
    let ca = plugin_bundle(&t.path().join("certs"));
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = fail(&[
        "request",
        "--addr",
        &format!("127.0.0.1:{port}"),
        "--root",
        path(&ca.join("root-cert.pem")),
        "--no-token",
    ]);
    assert_eq!(err.matches("Connection refused").count(), 1, "{err}");
}

/// `2036-11-26T01:51:24Z`
fn is_rfc3339(s: &str) -> bool {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok()
        && s.ends_with('Z')
}

fn is_rfc3339_range(line: &str) -> bool {
    let parts: Vec<&str> = line.split_whitespace().collect();
    matches!(parts.as_slice(), ["valid", from, "..", to] if is_rfc3339(from) && is_rfc3339(to))
}
