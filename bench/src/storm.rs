//! A renewal storm: N workloads (think: every pod of a cluster after a mass
//! restart), each opening its own TLS connection and asking once, their start
//! times spread evenly over a window. Failures are retried the way istio-agent
//! does (exponential backoff with jitter, on the codes it retries and on
//! connection errors). Reported: how many were served, how many gave up, and
//! the time until the last one held a certificate.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;

use meshsign::client::{self};

use crate::load::{endpoint, prepare};
use crate::{pool, procstat, Target};

#[derive(Args, Debug)]
pub struct StormArgs {
    #[command(flatten)]
    pub target: Target,
    /// Workloads (each with its own connection).
    #[arg(long, default_value_t = 20_000)]
    pub workloads: usize,
    /// All of them start within this window.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub window: Duration,
    /// Attempts per workload before it gives up.
    #[arg(long, default_value_t = 10)]
    pub attempts: u32,
}

const RETRIED: &[&str] = &[
    "Cancelled",
    "DeadlineExceeded",
    "ResourceExhausted",
    "Aborted",
    "Internal",
    "Unavailable",
    "connect",
];

pub async fn run(args: StormArgs) -> Result<(), String> {
    let pool = Arc::new(prepare(pool::load(&args.target.pool)?)?);
    if pool.len() < args.workloads {
        eprintln!(
            "note: pool has {} requests for {} workloads; some identities repeat",
            pool.len(),
            args.workloads
        );
    }
    let ep = endpoint(&args.target)?;
    let tls = Arc::new(client::client_tls_config(&ep)?);
    let pid = args.target.server_pid;
    if let Some(pid) = pid {
        procstat::reset_peak_rss(pid);
    }
    let cpu_start = pid.and_then(procstat::cpu);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(args.workloads);
    for i in 0..args.workloads {
        let at = start + args.window.mul_f64(i as f64 / args.workloads as f64);
        let pool = pool.clone();
        let ep = ep.clone();
        let tls = tls.clone();
        let attempts = args.attempts;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let p = &pool[i % pool.len()];
            let mut last_err = String::new();
            for attempt in 0..attempts {
                if attempt > 0 {
                    // istio-agent: 100ms base, exponential, 10% jitter (per RPC);
                    // the SDS layer keeps retrying up to 60s intervals.
                    let base = Duration::from_millis(100) * 2u32.pow(attempt.min(9));
                    let jitter = base.mul_f64(0.1 * ((i * 7919 + attempt as usize) % 100) as f64 / 100.0);
                    tokio::time::sleep(base.min(Duration::from_secs(30)) + jitter).await;
                }
                let result = match client::channel_with_tls(&ep, tls.clone()).await {
                    Ok(ch) => {
                        let mut c = meshsign::proto::istio_certificate_service_client::IstioCertificateServiceClient::new(ch);
                        crate::load::call(&mut c, p, 86_400).await.map(|_| ())
                    }
                    Err(_) => Err("connect".to_owned()),
                };
                match result {
                    Ok(()) => return (Ok(Instant::now()), attempt, at),
                    Err(code) if RETRIED.contains(&code.as_str()) => last_err = code,
                    Err(code) => return (Err(code), attempt, at),
                }
            }
            (Err(last_err), attempts, at)
        }));
    }
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).map_err(|e| e.to_string())?;
    let mut served = 0u64;
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    let mut retries = 0u64;
    let mut last_done = start;
    for t in tasks {
        let (result, attempts, at) = t.await.map_err(|e| e.to_string())?;
        retries += u64::from(attempts);
        match result {
            Ok(done) => {
                served += 1;
                last_done = last_done.max(done);
                let _ = hist.record((done - at).as_micros().max(1) as u64);
            }
            Err(code) => *failed.entry(code).or_default() += 1,
        }
    }
    let cpu = match (cpu_start, pid.and_then(procstat::cpu)) {
        (Some(a), Some(b)) => Some(b.seconds - a.seconds),
        _ => None,
    };
    let peak = pid.and_then(procstat::peak_rss_mib);
    let until_last = (last_done - start).as_secs_f64();
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "{:<40} {} workloads in {:?}: served {}, failed {:?}, retries {}, last certificate at {:.2}s, per-workload p50 {:.1} ms p99 {:.1} ms max {:.1} ms, server CPU {}, peak RSS {}",
        args.target.label,
        args.workloads,
        args.window,
        served,
        failed,
        retries,
        until_last,
        q(0.5),
        q(0.99),
        hist.max() as f64 / 1000.0,
        cpu.map_or("-".into(), |c| format!("{c:.2}s")),
        peak.map_or("-".into(), |r| format!("{r:.1} MiB")),
    );
    if let Some(path) = &args.target.json {
        crate::append_json(
            path,
            &json!({
                "label": args.target.label,
                "kind": "storm",
                "workloads": args.workloads,
                "window_s": args.window.as_secs_f64(),
                "served": served,
                "failed": failed,
                "retries": retries,
                "last_certificate_s": until_last,
                "latency_ms": { "p50": q(0.5), "p99": q(0.99), "max": hist.max() as f64 / 1000.0 },
                "server_cpu_s": cpu,
                "server_peak_rss_mib": peak,
            }),
        )?;
    }
    Ok(())
}
