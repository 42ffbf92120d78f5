//! `meshsign-bench`: the load generator and crypto-floor benchmark.
//!
//! - `pool`  pre-generates distinct CSRs and tokens (JSON lines) so no cache on
//!   the server can turn the benchmark into a lookup;
//! - `run`   drives any Istio-compatible CA (meshsign, istiod's CA) over real TLS
//!   with C connections × S streams, closed-loop or at a fixed rate, and reports
//!   throughput, HDR latency percentiles, errors by code, server CPU per 1,000
//!   certificates and server peak RSS;
//! - `storm` a renewal storm: N workloads, each with its own connection, all
//!   asking within a window, retrying like istio-agent;
//! - `floor` the unavoidable cryptography per certificate on one core;
//! - `kube-setup` creates one node's worth of pods, service accounts and
//!   pod-bound tokens on a Kubernetes API server for the Kubernetes path
//!   (`pool --tokens`, `run --requests --count-token-reviews`);
//! - `abuse` one hostile client (idle connections, slow handshakes, floods,
//!   rapid and late resets, CONTINUATION floods, held streams, oversized and
//!   nested requests) with legitimate renewals alongside, and `abuse-report`
//!   the table of those runs and their targets (`bench/abuse`);
//! - `soak` a bounded run of good and bad requests at a steady rate that
//!   fails unless the server's memory and open files stay flat and every
//!   good request succeeds (`bench/soak`).

mod abuse;
mod floor;
mod kube_setup;
mod kubemetrics;
mod load;
mod pool;
mod procstat;
mod soak;
mod storm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "meshsign-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Pre-generate a pool of distinct CSRs and tokens.
    Pool(pool::PoolArgs),
    /// Load one CA and report throughput and latency.
    Run(load::RunArgs),
    /// A renewal storm: N workloads asking within a window.
    Storm(storm::StormArgs),
    /// The crypto floor: certificates per second per core.
    Floor(floor::FloorArgs),
    /// Create workloads (service accounts, pods, pod-bound tokens) and a node
    /// agent on a Kubernetes API server.
    KubeSetup(kube_setup::KubeSetupArgs),
    /// One attack against a running CA, with legitimate renewals alongside.
    Abuse(abuse::AbuseArgs),
    /// The Markdown table of `abuse` results; fails if a target was missed.
    AbuseReport(abuse::ReportArgs),
    /// A bounded soak: good and bad requests at a steady rate, the server's
    /// memory and open files sampled; fails unless they stay flat and every
    /// good request succeeds (`bench/soak`).
    Soak(soak::SoakArgs),
}

/// How to reach the CA under test.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// CA address, host:port.
    #[arg(long)]
    pub addr: String,
    /// Root certificate(s) for the CA's serving certificate.
    #[arg(long)]
    pub root: PathBuf,
    /// TLS server name (istio-agent uses istiod.istio-system.svc for localhost).
    #[arg(long, default_value = "istiod.istio-system.svc")]
    pub server_name: String,
    /// The server's PID, for CPU and peak-RSS accounting (Linux /proc).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The pool file written by `pool`.
    #[arg(long)]
    pub pool: PathBuf,
    /// Label for the report.
    #[arg(long, default_value = "run")]
    pub label: String,
    /// Append the JSON result to this file (one object per line).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    // The attacker's thousands of sockets and the legitimate clients share
    // this process's descriptor table; each time the kernel doubles it, any
    // thread opening a socket meanwhile waits for an RCU grace period (tens
    // of ms), which would show as the legitimate clients' latency. Real
    // clients do not share a table with the attacker: grow it once, now.
    if let Ok(null) = std::fs::File::open("/dev/null") {
        meshsign::server::reserve_descriptor_table(&null, 65_536);
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let result = match cli.command {
        Command::Pool(args) => pool::run(args),
        Command::Floor(args) => floor::run(args),
        Command::Run(args) => runtime().and_then(|rt| rt.block_on(load::run(args))),
        Command::Storm(args) => runtime().and_then(|rt| rt.block_on(storm::run(args))),
        Command::KubeSetup(args) => runtime().and_then(|rt| rt.block_on(kube_setup::run(args))),
        Command::Abuse(args) => abuse::run(args),
        Command::AbuseReport(args) => abuse::report(args),
        Command::Soak(args) => soak::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// Appends one JSON object to `path`.
pub fn append_json(path: &std::path::Path, value: &serde_json::Value) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    writeln!(f, "{value}").map_err(|e| e.to_string())
}
