//! The `meshsign` command line: `serve`, `ca init`, `ca check`, `token`,
//! `request` and `audit verify`. Each subcommand is a thin shell over the
//! library.

/// jemalloc, as ztunnel uses. Measured with `meshsign-bench run` (bench/README.md):
/// 3-7% more certificates per second than glibc's malloc, and with 1,000
/// connections on an RSA CA 6 MiB less peak RSS, because glibc fragmented its
/// heap around the larger RSA handshake and answer buffers.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings: a background thread returns freed pages to the
/// system within about a second (jemalloc's default keeps them ~10 s and only
/// purges while allocating), so memory a flood of connections made us hold
/// goes back once the flood ends.
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use time::OffsetDateTime;

use meshsign::ca::generate::{self, CaSpec, KeyType};
use meshsign::ca::{Ca, CaBundle, CertSummary};
use meshsign::client::{self, CaEndpoint, CertificateRequest, CsrSubject, WorkloadKeyType};
use meshsign::config::Config;
use meshsign::logging::Rfc3339;
use meshsign::pki;
use meshsign::server;
use meshsign::spiffe::SpiffeId;
use meshsign::token::{DevTokenIssuer, TokenRequest, DEFAULT_AUDIENCE, DEV_ISSUER};

/// meshsign: a certificate authority for service meshes, speaking Istio's
/// CreateCertificate API.
///
/// Point istio-agent or ztunnel at it with CA_ADDR=<host>:15012 and it issues
/// SPIFFE workload certificates (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)
/// signed by your own intermediate CA.
///
/// Quick start (dev mode, no configuration):
///   meshsign serve                  # creates ./.meshsign with a root, an intermediate and a token issuer
///   meshsign request --out ./certs  # in another shell: a workload certificate
#[derive(Parser, Debug)]
#[command(name = "meshsign", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the CA server.
    ///
    /// Without --config, runs in dev mode: a root and an intermediate (ECDSA
    /// P-256) are created in the state directory on first start and reused
    /// later, and a local token issuer is trusted so `meshsign token` and
    /// `meshsign request` work out of the box; it listens on 127.0.0.1:15012
    /// only, unless --listen says otherwise. With a config file whose `ca.dir`
    /// names a plug-in CA directory (ca-cert.pem, ca-key.pem, cert-chain.pem,
    /// root-cert.pem, or tls.crt/tls.key/ca.crt), that CA signs instead; the
    /// bundle is verified first and start-up stops with the file and reason if
    /// anything is inconsistent.
    Serve(ServeArgs),
    /// Manage CA bundles: create a hierarchy, or check one.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Mint a service-account-like JWT from the dev token issuer.
    ///
    /// The token has Kubernetes projected-token claims (iss, sub
    /// system:serviceaccount:<ns>:<sa>, aud, exp, kubernetes.io). The issuer's
    /// key and public jwks.json live in the state directory; dev mode trusts it
    /// automatically, other configurations can list it under authn.jwt.
    ///
    /// Written without a trailing newline, as Kubernetes writes projected
    /// token files (ztunnel sends a token file's bytes as they are, and a
    /// newline makes the header invalid): `meshsign token > FILE` and
    /// `--out FILE` both give a file ztunnel and istio-agent accept. On a
    /// terminal a newline follows, for the prompt's sake.
    Token(TokenArgs),
    /// Act as a workload: make a key and CSR, request a certificate, verify
    /// the answer and write key.pem, cert-chain.pem and root-cert.pem.
    ///
    /// Authenticates with --token (a file), or --cert-dir (mTLS renewal with a
    /// certificate obtained earlier), or, when neither is given and the state
    /// directory holds the dev token issuer, with a freshly minted dev token.
    Request(RequestArgs),
    /// The tamper-evident audit trail (config section `audit`).
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Check an audit trail's hash chain and name every break.
    ///
    /// Detects an edited, removed, reordered or inserted record, a removed or
    /// renamed file, a file shortened after it was closed, and a last record
    /// cut short. Removing the newest records, or rewriting everything after
    /// some record, is only detected against a hash kept elsewhere: the
    /// server logs one ("audit anchor") every audit.anchor_interval and at
    /// shutdown; pass it with --anchor. Exits 1 on any break.
    #[command(verbatim_doc_comment)]
    Verify(AuditVerifyArgs),
}

#[derive(Args, Debug)]
struct AuditVerifyArgs {
    /// The audit directory, or audit files (audit-<index>.jsonl).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// SEQ:SHA256 of a record known from elsewhere (the "audit anchor" log
    /// line); may be repeated.
    #[arg(long)]
    anchor: Vec<String>,
    /// The first file need not begin the trail (older files removed by
    /// audit.max_files, or archived).
    #[arg(long)]
    allow_missing_start: bool,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// YAML configuration file (see config/ for commented examples).
    #[arg(long, short, env = "MESHSIGN_CONFIG")]
    config: Option<PathBuf>,
    /// Override `listen` (host:port) [default: 127.0.0.1:15012 in dev mode,
    /// 0.0.0.0:15012 with a plug-in CA, or the config file's `listen`].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Override `state_dir`.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Create a root and per-cluster signing CAs in Istio's plug-in layout
    /// (the equivalent of Istio's tools/certs Makefiles).
    ///
    /// Writes OUT/root-cert.pem and OUT/root-key.pem, and for each cluster
    /// OUT/<cluster>/{ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem},
    /// where cert-chain.pem is the signing CA followed by its issuers up to
    /// and including the root, as tools/certs writes it. Install with:
    ///   kubectl create secret generic cacerts -n istio-system --from-file=OUT/<cluster>/
    #[command(verbatim_doc_comment)]
    Init(InitArgs),
    /// Issue a new signing CA under an existing root (as `ca init` wrote it:
    /// ROOT/root-cert.pem and ROOT/root-key.pem), for a new cluster or to
    /// replace an intermediate, without touching the root.
    ///
    /// Writes OUT/{ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem}.
    #[command(verbatim_doc_comment)]
    Intermediate(IntermediateArgs),
    /// Stage a root rotation: create a new root and, for each current CA
    /// directory (state 1: old root, old intermediate), the three directories
    /// it goes through, each proven a safe step from the one before:
    ///   OUT/new-root/{root-cert.pem, root-key.pem}
    ///   OUT/step-2-both-roots/<name>/       old intermediate, old + new roots
    ///   OUT/step-3-new-intermediate/<name>/ new intermediate, old + new roots
    ///   OUT/step-4-new-root-only/<name>/    new intermediate, new root
    /// where <name> is the current directory's name. Install each in turn
    /// (README, "Rotating the root" says how long to wait between them).
    #[command(verbatim_doc_comment)]
    RotateRoot(RotateRootArgs),
    /// Load and verify a CA bundle directory exactly as `serve` would, and
    /// print what it holds and where it stands in a root rotation.
    Check {
        /// The bundle directory.
        dir: PathBuf,
        /// The trust domain the test signing is for (matters for an
        /// intermediate with URI name constraints).
        #[arg(long, default_value = meshsign::ca::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
}

#[derive(Args, Debug)]
struct InitArgs {
    /// Output directory.
    #[arg(long, short)]
    out: PathBuf,
    /// Comma-separated cluster names; one signing CA each.
    #[arg(long, value_delimiter = ',', default_value = "cluster1")]
    clusters: Vec<String>,
    /// Levels below the root: 1 = root → cluster CA (tools/certs); 2 adds a
    /// shared intermediate between them, and so on.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=4))]
    levels: u8,
    #[command(flatten)]
    ca: NewCaArgs,
    /// Root lifetime in days.
    #[arg(long, default_value_t = 3650)]
    root_days: i64,
    /// Overwrite an existing root in OUT.
    #[arg(long)]
    force: bool,
}

/// Subject and lifetime of the CAs a CLI command creates.
#[derive(Args, Debug)]
struct NewCaArgs {
    /// Key type: ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096, ed25519.
    #[arg(long, default_value = "ecdsa-p256")]
    key_type: KeyType,
    /// Organization (O=).
    #[arg(long, default_value = "Istio")]
    org: String,
    /// Intermediate lifetime in days (never past the root's).
    #[arg(long, default_value_t = 3650)]
    intermediate_days: i64,
}

impl NewCaArgs {
    fn spec(&self, cn: &str, locality: Option<&str>, days: i64, path_len: Option<u8>) -> CaSpec {
        CaSpec {
            organization: self.org.clone(),
            common_name: cn.to_owned(),
            locality: locality.map(str::to_owned),
            key_type: self.key_type,
            validity: time::Duration::days(days),
            path_len,
        }
    }

    /// A cluster's signing CA, as `ca init` makes it.
    fn intermediate(&self, cluster: Option<&str>) -> CaSpec {
        self.spec("Intermediate CA", cluster, self.intermediate_days, Some(0))
    }
}

#[derive(Args, Debug)]
struct IntermediateArgs {
    /// Directory with root-cert.pem and root-key.pem.
    #[arg(long)]
    root: PathBuf,
    /// Output directory (a plug-in CA directory).
    #[arg(long, short)]
    out: PathBuf,
    /// Cluster name, written as L= (as tools/certs does).
    #[arg(long)]
    cluster: Option<String>,
    #[command(flatten)]
    ca: NewCaArgs,
    /// Overwrite a CA bundle already in OUT.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct RotateRootArgs {
    /// A current plug-in CA directory (state 1); repeat for every cluster
    /// whose CA is under the root being replaced.
    #[arg(long, required = true)]
    current: Vec<PathBuf>,
    /// Output directory.
    #[arg(long, short)]
    out: PathBuf,
    #[command(flatten)]
    ca: NewCaArgs,
    /// New root lifetime in days.
    #[arg(long, default_value_t = 3650)]
    root_days: i64,
}

#[derive(Args, Debug)]
struct TokenArgs {
    /// Directory holding the dev token issuer (created if missing).
    #[arg(long, default_value = ".meshsign")]
    state_dir: PathBuf,
    #[arg(long, short, default_value = "default")]
    namespace: String,
    #[arg(long, short = 's', default_value = "default")]
    service_account: String,
    #[arg(long, default_value = DEFAULT_AUDIENCE)]
    audience: String,
    /// The `iss` claim (a different one is useful to test rejection).
    #[arg(long, default_value = DEV_ISSUER)]
    issuer: String,
    /// Lifetime, e.g. 1h, 12h.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Mint a token that expired an hour ago.
    #[arg(long)]
    expired: bool,
    /// Write the token to this file (mode 0600) instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RequestArgs {
    /// CA address, host:port.
    #[arg(long, default_value = "localhost:15012")]
    addr: String,
    /// Root certificate(s) the CA's serving certificate chains to
    /// [default: <state-dir>/root-cert.pem].
    #[arg(long)]
    root: Option<PathBuf>,
    /// TLS server name [default: the host of --addr].
    #[arg(long)]
    server_name: Option<String>,
    /// Speak plaintext gRPC (only against a server with insecure_plaintext).
    #[arg(long)]
    plaintext: bool,
    /// Dev state directory (dev token issuer, default root).
    #[arg(long, default_value = ".meshsign")]
    state_dir: PathBuf,
    #[arg(long, short, default_value = "default")]
    namespace: String,
    #[arg(long, short = 's', default_value = "default")]
    service_account: String,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// File holding a bearer token (e.g. a Kubernetes projected token).
    #[arg(long, conflicts_with = "no_token")]
    token: Option<PathBuf>,
    /// Send no token (e.g. to authenticate with --cert-dir only).
    #[arg(long)]
    no_token: bool,
    /// Authenticate with the key.pem/cert-chain.pem in this directory (mTLS renewal).
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// Use an ECDSA P-256 key instead of RSA 2048 (istio-agent's default).
    #[arg(long)]
    ecdsa: bool,
    /// Use an ECDSA P-384 key.
    #[arg(long, conflicts_with = "ecdsa")]
    ecdsa_p384: bool,
    /// Requested lifetime (validity_duration); 0 asks for the server default.
    #[arg(long, default_value = "24h", value_parser = parse_ttl)]
    ttl: Duration,
    /// ClusterID header, as istio-agent sends it.
    #[arg(long, default_value = "Kubernetes")]
    cluster_id: String,
    /// Ask, as ztunnel does, for this pod identity with the caller's own
    /// token (`ImpersonatedIdentity` metadata, an empty-subject CSR for the
    /// identity). Needs a trusted node account on the server.
    #[arg(long, value_name = "SPIFFE_ID")]
    impersonate: Option<String>,
    /// Where to write key.pem, cert-chain.pem and root-cert.pem.
    #[arg(long, short, default_value = "workload-certs")]
    out: PathBuf,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Agents hold one connection each: thousands of sockets are normal.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    init_logging();
    // One worker per CPU. A single-threaded scheduler on one CPU was measured
    // too: +4-10% throughput at 64 streams, because answers wait for the
    // connection task and go out together, but for the same reason the p99 at
    // half saturation went from ~3.5 ms to 9 ms (bench/README.md).
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // Without the LIFO slot, a connection task woken by a finished answer
    // queues behind the connection's other ready requests instead of running
    // at once, so their answers leave in one write: +3-5% certificates/s at 64
    // streams, half-saturation p99 unchanged (bench/README.md). Needs
    // `--cfg tokio_unstable` (.cargo/config.toml).
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Ca(CaCommand::Init(args)) => ca_init(args),
            Command::Ca(CaCommand::Intermediate(args)) => ca_intermediate(args),
            Command::Ca(CaCommand::RotateRoot(args)) => ca_rotate_root(args),
            Command::Ca(CaCommand::Check { dir, trust_domain }) => ca_check(&dir, &trust_domain),
            Command::Token(args) => token(args),
            Command::Request(args) => request(args).await,
            Command::Audit(AuditCommand::Verify(args)) => audit_verify(args),
        }
    });
    // Buffered log lines first, so the final error comes last.
    meshsign::logging::LogSink::stderr().flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MESHSIGN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(meshsign::logging::BatchedWriter(
            meshsign::logging::LogSink::stderr(),
        ))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
        None => Config::dev_default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = &args.state_dir {
        config.state_dir = dir.clone();
    }
    for warning in config.startup_warnings() {
        tracing::warn!("{warning}");
    }
    // Installed before the (possibly slow) start, so that a SIGHUP meanwhile
    // is a reload request, not the default action (exit).
    let hangups = hangup_signals();
    let mut running = server::start(&config).await.map_err(|e| e.to_string())?;
    if let Some(state) = running.dev {
        let exe = std::env::args().next().unwrap_or_else(|| "meshsign".into());
        let dir = config.state_dir.display();
        let how = match state {
            meshsign::ca::dev::DevCaState::Created => "created",
            meshsign::ca::dev::DevCaState::Reused => "reused",
            meshsign::ca::dev::DevCaState::IntermediateRenewed => "reused (intermediate renewed)",
        };
        let addr = running.local_addr;
        let req_addr = if addr.ip().is_unspecified() {
            format!("localhost:{}", addr.port())
        } else {
            addr.to_string()
        };
        println!(
            "meshsign dev CA {how} in {dir} (root: {dir}/root-cert.pem), serving on {addr}.\n\
             Request a workload certificate from another shell:\n  \
             {exe} request --addr {req_addr} --state-dir {dir} --out workload-certs\n  \
             openssl verify -CAfile workload-certs/root-cert.pem -untrusted workload-certs/cert-chain.pem workload-certs/cert-chain.pem"
        );
    }
    let reloads = reload_on_hangup(running.reloader(), args, hangups);
    tokio::select! {
        r = running.wait() => r,
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            running.shutdown().await
        }
        _ = reloads => Ok(()),
    }
}

/// The `SIGHUP` stream (`None` where there is none).
#[cfg(unix)]
fn hangup_signals() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    signal(SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
fn hangup_signals() -> Option<()> {
    None
}

/// On every `SIGHUP`, reads the configuration file again (with the same
/// command-line overrides) and applies it if it can be applied whole.
#[cfg(unix)]
async fn reload_on_hangup(
    reloader: std::sync::Arc<server::ConfigReloader>,
    args: ServeArgs,
    hangups: Option<tokio::signal::unix::Signal>,
) {
    let Some(mut hangups) = hangups else {
        return std::future::pending().await;
    };
    while hangups.recv().await.is_some() {
        let Some(path) = &args.config else {
            tracing::warn!("SIGHUP: serving without --config, there is no file to reload");
            continue;
        };
        tracing::info!(file = %path.display(), "SIGHUP: reloading the configuration");
        let next = Config::from_file(path).map(|mut c| {
            if let Some(listen) = args.listen {
                c.listen = listen;
            }
            if let Some(dir) = &args.state_dir {
                c.state_dir = dir.clone();
            }
            c
        });
        // Logged and counted by the reloader.
        let _ = reloader.reload(next).await;
    }
    std::future::pending().await
}

#[cfg(not(unix))]
async fn reload_on_hangup(_: std::sync::Arc<server::ConfigReloader>, _: ServeArgs, _: Option<()>) {
    std::future::pending().await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn ca_init(args: InitArgs) -> Result<(), String> {
    let now = OffsetDateTime::now_utc();
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let root_cert_path = args.out.join("root-cert.pem");
    if root_cert_path.exists() && !args.force {
        return Err(format!(
            "{} exists; pass --force to replace the root (every cluster must then be re-issued)",
            root_cert_path.display()
        ));
    }
    for c in &args.clusters {
        if c.is_empty() || c.contains('/') || c.starts_with('.') {
            return Err(format!("invalid cluster name {c:?}"));
        }
    }
    let spec = |cn: &str, locality: Option<&str>, days: i64, path_len: Option<u8>| {
        args.ca.spec(cn, locality, days, path_len)
    };
    let levels = args.levels;
    let root = generate::root(&spec("Root CA", None, args.root_days, None), now)
        .map_err(|e| e.to_string())?;
    generate::write_file(&args.out.join("root-key.pem"), &root.key_pem(), true)
        .map_err(|e| e.to_string())?;
    generate::write_file(&root_cert_path, &root.cert_pem, false).map_err(|e| e.to_string())?;

    // Shared intermediates between the root and the cluster CAs (levels > 1).
    let mut parents = vec![root];
    for i in 1..levels {
        let parent = parents.last().ok_or("no parent")?;
        let cn = format!("Intermediate CA {i}");
        let ca = generate::intermediate(
            parent,
            &spec(&cn, None, args.ca.intermediate_days, Some(levels - i)),
            now,
        )
        .map_err(|e| e.to_string())?;
        parents.push(ca);
    }
    let issuer = parents.last().ok_or("no issuer")?;
    let root_pem = parents[0].cert_pem.clone();
    for cluster in &args.clusters {
        let ca = generate::intermediate(issuer, &args.ca.intermediate(Some(cluster)), now)
            .map_err(|e| e.to_string())?;
        // tools/certs: cert-chain.pem = ca-cert.pem followed by its issuers, root included.
        let mut chain = ca.cert_pem.clone();
        for p in parents.iter().rev() {
            chain.push_str(&p.cert_pem);
        }
        let dir = args.out.join(cluster);
        generate::write_istio_layout(&dir, &ca, &chain, &root_pem)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        // Prove it loads exactly as `serve` will load it.
        Ca::load(&dir, now).map_err(|e| e.to_string())?;
        println!(
            "{}: signing CA for cluster {cluster} ({})",
            dir.display(),
            args.ca.key_type
        );
    }
    println!(
        "{}: root ({}); keep root-key.pem offline",
        args.out.display(),
        args.ca.key_type
    );
    Ok(())
}

fn ca_intermediate(args: IntermediateArgs) -> Result<(), String> {
    let now = OffsetDateTime::now_utc();
    let read = |f: &str| {
        let path = args.root.join(f);
        std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let root_pem = read("root-cert.pem")?;
    let root = generate::reload(&root_pem, &read("root-key.pem")?)
        .map_err(|e| format!("{}: {e}", args.root.display()))?;
    if args.out.join("ca-cert.pem").exists() && !args.force {
        return Err(format!(
            "{} already holds a CA; pass --force to replace it",
            args.out.display()
        ));
    }
    let ca = generate::intermediate(&root, &args.ca.intermediate(args.cluster.as_deref()), now)
        .map_err(|e| e.to_string())?;
    let chain = format!("{}{}", ca.cert_pem, root.cert_pem);
    generate::write_istio_layout(&args.out, &ca, &chain, &root_pem)
        .map_err(|e| format!("{}: {e}", args.out.display()))?;
    Ca::load(&args.out, now).map_err(|e| e.to_string())?;
    println!(
        "{}: signing CA ({}) under the root in {}",
        args.out.display(),
        args.ca.key_type,
        args.root.display()
    );
    Ok(())
}

fn ca_rotate_root(args: RotateRootArgs) -> Result<(), String> {
    use meshsign::ca::rotation;
    let now = OffsetDateTime::now_utc();
    let root_dir = args.out.join("new-root");
    if root_dir.join("root-cert.pem").exists() {
        return Err(format!(
            "{} exists: a rotation is already staged there",
            root_dir.display()
        ));
    }
    let mut names = Vec::new();
    for dir in &args.current {
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .ok_or_else(|| format!("{}: not a directory", dir.display()))?;
        if names.contains(&name) {
            return Err(format!("two --current directories are named {name:?}"));
        }
        names.push(name);
    }
    // Dated, so the two roots of a rotation tell apart in `ca check`.
    let cn = format!("Root CA {}", now.date());
    let root = generate::root(&args.ca.spec(&cn, None, args.root_days, None), now)
        .map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&root_dir)
        .and_then(|()| generate::write_file(&root_dir.join("root-key.pem"), &root.key_pem(), true))
        .map_err(|e| format!("{}: {e}", root_dir.display()))?;
    generate::write_file(&root_dir.join("root-cert.pem"), &root.cert_pem, false)
        .map_err(|e| format!("{}: {e}", root_dir.display()))?;
    for (dir, name) in args.current.iter().zip(&names) {
        let new_int = generate::intermediate(&root, &args.ca.intermediate(Some(name)), now)
            .map_err(|e| e.to_string())?;
        let staging = tempfile_dir(&args.out, name)?;
        let written = rotation::stage_rotation(dir, &root, &new_int, &staging, now)?;
        for (stage, from) in rotation::STAGES.iter().zip(written) {
            let to = args.out.join(stage).join(name);
            std::fs::create_dir_all(args.out.join(stage))
                .and_then(|()| std::fs::rename(&from, &to))
                .map_err(|e| format!("{}: {e}", to.display()))?;
            println!("{}", to.display());
        }
        let _ = std::fs::remove_dir(&staging);
    }
    println!(
        "{}: the new root ({}); keep root-key.pem offline. Install the steps in order \
         (README, \"Rotating the root\").",
        root_dir.display(),
        args.ca.key_type
    );
    Ok(())
}

/// An empty scratch directory `OUT/.staging-<name>`.
fn tempfile_dir(out: &Path, name: &str) -> Result<PathBuf, String> {
    let dir = out.join(format!(".staging-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

fn ca_check(dir: &Path, trust_domain: &str) -> Result<(), String> {
    let now = OffsetDateTime::now_utc();
    let bundle = CaBundle::load(dir, now).map_err(|e| format!("bundle rejected: {e}"))?;
    println!("{}: {}", dir.display(), bundle.layout);
    print_summaries(&bundle.describe(), now);
    let ca = Ca::new(bundle, trust_domain, now).map_err(|e| format!("bundle rejected: {e}"))?;
    let b = ca.bundle();
    println!(
        "signing key: {} ({:?}); leaves expire no later than {} ({} days from now)",
        b.key_kind,
        b.scheme,
        Rfc3339(b.not_after),
        (b.not_after - now).whole_days()
    );
    let mut warnings = Vec::new();
    if b.not_after - now < time::Duration::days(30) {
        warnings.push(format!(
            "the signing path expires within 30 days ({})",
            Rfc3339(b.not_after)
        ));
    }
    let signing = pki::parse_cert(&b.signing_cert)?;
    if !signing.iter_extensions().any(|e| {
        matches!(
            e.parsed_extension(),
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(_)
        )
    }) {
        warnings.push("the signing certificate has no Subject Key Identifier; leaves will carry no Authority Key Identifier".into());
    }
    if let Some(w) = meshsign::ca::bundle::key_file_exposure(&b.dir, b.layout) {
        warnings.push(w.to_string());
    }
    for w in &warnings {
        println!("warning: {w}");
    }
    println!(
        "rotation: {}",
        meshsign::ca::rotation::stage(&ca, now).explain()
    );
    println!("OK: test signing verified against the roots");
    Ok(())
}

fn print_summaries(items: &[(String, CertSummary)], now: OffsetDateTime) {
    for (where_, s) in items {
        println!(
            "  {where_}\n    subject: {}\n    issuer:  {}\n    key: {}  CA: {}  valid: {} .. {} ({} days left)",
            s.subject,
            s.issuer,
            s.key,
            s.is_ca,
            s.not_before.date(),
            s.not_after.date(),
            (s.not_after - now).whole_days()
        );
    }
}

fn token(args: TokenArgs) -> Result<(), String> {
    let issuer = DevTokenIssuer::load_or_create(&args.state_dir)?;
    let token = issuer.mint(&TokenRequest {
        namespace: &args.namespace,
        service_account: &args.service_account,
        audience: &args.audience,
        issuer: &args.issuer,
        ttl: args.ttl,
        expired: args.expired,
    })?;
    match &args.out {
        Some(path) => {
            generate::write_file(path, &token, true).map_err(|e| format!("{}: {e}", path.display()))
        }
        None => {
            use std::io::{IsTerminal, Write};
            let mut stdout = std::io::stdout().lock();
            let newline = if stdout.is_terminal() { "\n" } else { "" };
            write!(stdout, "{token}{newline}")
                .and_then(|()| stdout.flush())
                .map_err(|e| format!("stdout: {e}"))
        }
    }
}

async fn request(args: RequestArgs) -> Result<(), String> {
    let identity = match &args.impersonate {
        Some(id) => SpiffeId::parse(id).map_err(|e| format!("--impersonate {id:?}: {e}"))?,
        None => SpiffeId::new(&args.trust_domain, &args.namespace, &args.service_account)
            .map_err(|e| e.to_string())?,
    };
    let roots = if args.plaintext {
        Vec::new()
    } else {
        let path = args
            .root
            .clone()
            .unwrap_or_else(|| args.state_dir.join("root-cert.pem"));
        let pem = std::fs::read(&path)
            .map_err(|e| format!("root certificate {}: {e}", path.display()))?;
        pki::parse_certificates_nonempty(&pem).map_err(|e| format!("{}: {e}", path.display()))?
    };
    let client_identity = match &args.cert_dir {
        Some(dir) => {
            let chain_pem = std::fs::read(dir.join("cert-chain.pem"))
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            let chain = pki::parse_certificates_nonempty(&chain_pem).map_err(|e| e.to_string())?;
            let key_pem = std::fs::read_to_string(dir.join("key.pem"))
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            Some((chain, key_pem))
        }
        None => None,
    };
    let token = if let Some(path) = &args.token {
        Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("token {}: {e}", path.display()))?
                .trim()
                .to_owned(),
        )
    } else if args.no_token || args.cert_dir.is_some() {
        None
    } else if args.state_dir.join("jwt-signing-key.pem").exists() {
        let issuer = DevTokenIssuer::load_or_create(&args.state_dir)?;
        Some(issuer.mint(&TokenRequest::new(&args.namespace, &args.service_account))?)
    } else {
        return Err(format!(
            "no credentials: pass --token FILE or --cert-dir DIR (no dev token issuer in {})",
            args.state_dir.display()
        ));
    };

    let key_type = if args.ecdsa {
        WorkloadKeyType::EcdsaP256
    } else if args.ecdsa_p384 {
        WorkloadKeyType::EcdsaP384
    } else {
        WorkloadKeyType::Rsa2048
    };
    let key = key_type.generate()?;
    let subject = if args.impersonate.is_some() {
        CsrSubject::Empty
    } else {
        CsrSubject::IstioAgent
    };
    let csr_pem = client::make_csr(&key, &identity, subject)?;
    let mut ca = client::connect(&CaEndpoint {
        addr: args.addr.clone(),
        server_name: args.server_name.clone(),
        roots,
        client_identity,
    })
    .await?;
    let ttl_seconds = i64::try_from(args.ttl.as_secs()).map_err(|_| "ttl too large")?;
    let elements = client::create_certificate(
        &mut ca,
        &CertificateRequest {
            csr_pem,
            ttl_seconds,
            token: token.as_deref(),
            cluster_id: &args.cluster_id,
            impersonate: args.impersonate.as_deref(),
        },
    )
    .await
    .map_err(|s| format!("CreateCertificate failed: {}", client::describe_status(&s)))?;
    let issued = client::verify_response(&elements, &key, &identity, OffsetDateTime::now_utc())?;

    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    generate::write_file(&args.out.join("key.pem"), &key.serialize_pem(), true)
        .map_err(|e| e.to_string())?;
    generate::write_file(&args.out.join("cert-chain.pem"), &issued.chain_pem, false)
        .map_err(|e| e.to_string())?;
    generate::write_file(&args.out.join("root-cert.pem"), &issued.root_pem, false)
        .map_err(|e| e.to_string())?;
    println!(
        "issued {identity}\n  serial {}\n  valid {} .. {}\n  chain: {} elements, verified against the returned root\n  wrote {}/{{key.pem,cert-chain.pem,root-cert.pem}}",
        issued.serial_hex,
        Rfc3339(issued.not_before),
        Rfc3339(issued.not_after),
        elements.len(),
        args.out.display()
    );
    Ok(())
}

fn audit_verify(args: AuditVerifyArgs) -> Result<(), String> {
    use meshsign::audit::{record::hex, verify, verify::Anchor, VerifyOptions};
    let anchors = args
        .anchor
        .iter()
        .map(|a| a.parse::<Anchor>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let report = verify(
        &args.paths,
        &VerifyOptions {
            allow_missing_start: args.allow_missing_start,
            anchors,
        },
    )
    .map_err(|e| e.to_string())?;
    for w in &report.warnings {
        println!("warning: {w}");
    }
    if !report.is_intact() {
        for p in &report.problems {
            println!("BROKEN: {p}");
        }
        return Err(format!(
            "audit trail broken: {} problem(s) in {} file(s)",
            report.problems.len(),
            report.files.len()
        ));
    }
    let range = match (report.first_seq, report.last_seq) {
        (Some(a), Some(b)) => format!(" (seq {a}..={b})"),
        _ => String::new(),
    };
    println!(
        "OK: {} file(s), {} records{range}: {} issued, {} refused, {} recorded as lost",
        report.files.len(),
        report.records,
        report.issued,
        report.refused,
        report.lost
    );
    if let (Some(first), Some(last)) = (&report.first_time, &report.last_time) {
        println!("  from {first} to {last}");
    }
    if let (Some(seq), Some(hash)) = (report.last_seq, report.last_hash) {
        println!(
            "  newest record: seq {seq}, sha256 {}; only an anchor kept elsewhere shows that \
             nothing after it was removed (--anchor SEQ:SHA256 from the \"audit anchor\" log line)",
            hex(&hash)
        );
    }
    Ok(())
}
