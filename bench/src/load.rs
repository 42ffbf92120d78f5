//! Steady load: C TLS connections × S concurrent streams each, closed-loop
//! (as fast as the server answers) or open-loop at a fixed rate. Latency is
//! recorded in an HDR histogram in microseconds; in open-loop mode it is
//! measured from each request's *intended* start, so a stalled server cannot
//! hide its queueing (no coordinated omission).
//!
//! The intended starts come from one pacer task that hands each start time
//! to whichever stream is free. tokio's timer wheel has 1 ms ticks and rounds
//! up: paced with `sleep_until` alone, every request left 0-1 ms after its
//! intended start and that lateness was counted as server latency. So the
//! pacer sleeps until two ticks before a start and then yields to the other
//! tasks until the start time has come; this keeps the load generator's own
//! CPU busy, which is why bench/run pins it apart from the server. (A pacer
//! thread was tried: the kernel's scheduler let it run late behind the
//! runtime's thread on the same CPU.)
//!
//! With `--requests N` the run is a fixed amount of work instead (closed
//! loop, no warm-up): request k uses pool entry k mod size, so with N = R ×
//! size every entry is sent R times, in R rounds; throughput is answers over
//! the time until the last one. `--count-token-reviews KUBECONFIG` reads the
//! API server's own TokenReview counter before and after.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use meshsign::client::{self, CaEndpoint};
use meshsign::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use meshsign::proto::IstioCertificateRequest;
use meshsign::spiffe::SpiffeId;

use crate::{pool, procstat, Target};

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub target: Target,
    /// Fixed work: send exactly this many requests (closed loop, no warm-up;
    /// --duration and --warmup are ignored).
    #[arg(long, conflicts_with = "rate")]
    pub requests: Option<u64>,
    /// Count the TokenReviews the run causes, from the `/metrics` of the API
    /// server this kubeconfig names (before and after the run).
    #[arg(long)]
    pub count_token_reviews: Option<std::path::PathBuf>,
    /// TLS connections.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Concurrent streams per connection.
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Measured duration.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    pub duration: Duration,
    /// Unmeasured warm-up before it.
    #[arg(long, default_value = "2s", value_parser = crate::parse_duration)]
    pub warmup: Duration,
    /// Fixed rate in requests/second (open loop); omitted = closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Verify every Nth answer completely (chain to the root, SAN); 0 = never.
    #[arg(long, default_value_t = 50)]
    pub verify_every: u64,
    /// Requested validity_duration in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub ttl: i64,
}

/// A request ready to send: everything pre-built so the loop only clones.
pub struct Prepared {
    pub identity: SpiffeId,
    pub csr: String,
    pub auth: MetadataValue<tonic::metadata::Ascii>,
    pub cluster_id: Option<MetadataValue<tonic::metadata::Ascii>>,
    /// Request metadata (`ImpersonatedIdentity`).
    pub metadata: Option<prost_types::Struct>,
}

pub fn prepare(entries: Vec<pool::Entry>) -> Result<Vec<Prepared>, String> {
    entries
        .into_iter()
        .map(|e| {
            Ok(Prepared {
                identity: SpiffeId::parse(&e.identity).map_err(|err| err.to_string())?,
                auth: format!("Bearer {}", e.token)
                    .parse()
                    .map_err(|_| "token is not a header value".to_owned())?,
                cluster_id: e
                    .cluster_id
                    .map(|c| c.parse())
                    .transpose()
                    .map_err(|_| "cluster ID is not a header value".to_owned())?,
                metadata: e.impersonate.map(|id| prost_types::Struct {
                    fields: [(
                        "ImpersonatedIdentity".to_owned(),
                        prost_types::Value {
                            kind: Some(prost_types::value::Kind::StringValue(id)),
                        },
                    )]
                    .into(),
                }),
                csr: e.csr,
            })
        })
        .collect()
}

pub fn endpoint(t: &Target) -> Result<CaEndpoint, String> {
    let pem = std::fs::read(&t.root).map_err(|e| format!("{}: {e}", t.root.display()))?;
    Ok(CaEndpoint {
        addr: t.addr.clone(),
        server_name: Some(t.server_name.clone()),
        roots: meshsign::pki::parse_certificates_nonempty(&pem).map_err(|e| e.to_string())?,
        client_identity: None,
    })
}

/// One request; returns the gRPC code name on failure.
pub async fn call(
    client: &mut IstioCertificateServiceClient<Channel>,
    p: &Prepared,
    ttl: i64,
) -> Result<Vec<String>, String> {
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: p.csr.clone(),
        validity_duration: ttl,
        metadata: p.metadata.clone(),
    });
    req.metadata_mut().insert("authorization", p.auth.clone());
    if let Some(c) = &p.cluster_id {
        req.metadata_mut().insert("clusterid", c.clone());
    }
    match client.create_certificate(req).await {
        Ok(r) => Ok(r.into_inner().cert_chain),
        Err(s) => Err(format!("{:?}", s.code())),
    }
}

#[derive(Default)]
struct Outcome {
    hist: Option<Histogram<u64>>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    verified: u64,
    verify_failures: Vec<String>,
}

pub async fn run(args: RunArgs) -> Result<(), String> {
    let pool = Arc::new(prepare(pool::load(&args.target.pool)?)?);
    let ep = endpoint(&args.target)?;
    let mut clients = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        clients.push(client::connect(&ep).await?);
    }
    let reviews = match &args.count_token_reviews {
        Some(kubeconfig) => {
            let m = crate::kubemetrics::ApiServerMetrics::connect(kubeconfig).await?;
            let before = m.token_reviews().await?;
            Some((m, before))
        }
        None => None,
    };
    let next = Arc::new(AtomicUsize::new(0));
    let limit = args.requests.map_or(usize::MAX, |n| n as usize);
    let start = Instant::now();
    let (measure_from, deadline) = match args.requests {
        // Fixed work: everything counts, however long it takes.
        Some(_) => (start, start + Duration::from_secs(365 * 86_400)),
        None => (start + args.warmup, start + args.warmup + args.duration),
    };

    // Server accounting starts with the measured window.
    let pid = args.target.server_pid;
    let mut cpu_start = None;

    // Open loop: the pacer releases intended start times on schedule; streams
    // take them in turn. If every stream is busy they queue here, and the
    // wait counts as latency.
    let starts = args.rate.map(|rate| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        tokio::spawn(async move {
            const TICK: Duration = Duration::from_millis(2);
            for k in 0u64.. {
                let at = start + Duration::from_secs_f64(k as f64 / rate);
                if at >= deadline {
                    break;
                }
                if let Some(early) = at.checked_sub(TICK) {
                    tokio::time::sleep_until(early.into()).await;
                }
                while Instant::now() < at {
                    tokio::task::yield_now().await;
                }
                if tx.send(at).is_err() {
                    break;
                }
            }
        });
        Arc::new(tokio::sync::Mutex::new(rx))
    });

    let mut tasks = Vec::new();
    for client in &clients {
        for _ in 0..args.streams {
            let mut client = client.clone();
            let pool = pool.clone();
            let next = next.clone();
            let starts = starts.clone();
            let ttl = args.ttl;
            let verify_every = args.verify_every;
            tasks.push(tokio::spawn(async move {
                let mut out = Outcome {
                    hist: Histogram::new_with_bounds(1, 60_000_000, 3).ok(),
                    ..Outcome::default()
                };
                loop {
                    let intended = match &starts {
                        Some(starts) => {
                            // None: the pacer has reached the deadline.
                            let Some(at) = starts.lock().await.recv().await else {
                                break;
                            };
                            at
                        }
                        None => {
                            let now = Instant::now();
                            if now >= deadline {
                                break;
                            }
                            now
                        }
                    };
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= limit {
                        break;
                    }
                    let p = &pool[i % pool.len()];
                    let result = call(&mut client, p, ttl).await;
                    let done = Instant::now();
                    if intended < measure_from || done > deadline {
                        continue;
                    }
                    match result {
                        Ok(chain) => {
                            out.ok += 1;
                            if let Some(h) = out.hist.as_mut() {
                                let _ = h.record((done - intended).as_micros().max(1) as u64);
                            }
                            if verify_every > 0 && (out.ok - 1) % verify_every == 0 {
                                match client::verify_issued(
                                    &chain,
                                    &p.identity,
                                    ::time::OffsetDateTime::now_utc(),
                                ) {
                                    Ok(_) => out.verified += 1,
                                    Err(e) => out.verify_failures.push(e),
                                }
                            }
                        }
                        Err(code) => *out.errors.entry(code).or_default() += 1,
                    }
                }
                out
            }));
        }
    }

    if let Some(pid) = pid {
        tokio::time::sleep_until(measure_from.into()).await;
        procstat::reset_peak_rss(pid);
        cpu_start = procstat::cpu(pid);
    }
    let mut total = Outcome {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).ok(),
        ..Outcome::default()
    };
    for t in tasks {
        let o = t.await.map_err(|e| e.to_string())?;
        total.ok += o.ok;
        total.verified += o.verified;
        total.verify_failures.extend(o.verify_failures);
        for (k, v) in o.errors {
            *total.errors.entry(k).or_default() += v;
        }
        if let (Some(h), Some(oh)) = (total.hist.as_mut(), o.hist.as_ref()) {
            let _ = h.add(oh);
        }
    }
    let cpu_end = pid.and_then(procstat::cpu);
    let peak_rss = pid.and_then(procstat::peak_rss_mib);
    let secs = match args.requests {
        Some(_) => start.elapsed().as_secs_f64(),
        None => args.duration.as_secs_f64(),
    };
    let token_reviews = match reviews {
        Some((m, before)) => Some(m.token_reviews().await?.since(&before)),
        None => None,
    };
    let throughput = total.ok as f64 / secs;
    let cpu_per_1000 = match (cpu_start, cpu_end) {
        (Some(a), Some(b)) if total.ok > 0 => {
            Some((b.seconds - a.seconds) / total.ok as f64 * 1000.0)
        }
        _ => None,
    };
    let h = total.hist.as_ref();
    let q = |p: f64| {
        h.map(|h| h.value_at_quantile(p) as f64 / 1000.0)
            .unwrap_or(0.0)
    };
    let result = json!({
        "label": args.target.label,
        "addr": args.target.addr,
        "connections": args.connections,
        "streams": args.streams,
        "concurrency": args.connections * args.streams,
        "rate": args.rate,
        "duration_s": secs,
        "ok": total.ok,
        "errors": total.errors,
        "throughput_rps": throughput,
        "latency_ms": {
            "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999),
            "max": h.map(|h| h.max() as f64 / 1000.0).unwrap_or(0.0),
            "mean": h.map(|h| h.mean() / 1000.0).unwrap_or(0.0),
        },
        "server_cpu_s_per_1000": cpu_per_1000,
        "server_peak_rss_mib": peak_rss,
        "verified": total.verified,
        "verify_failures": total.verify_failures.len(),
        "requests": args.requests,
        "pool_size": pool.len(),
        "token_reviews": token_reviews.as_ref().map(|r| r.total),
        "token_reviews_failed": token_reviews.as_ref().map(|r| r.failed),
        "token_reviews_per_cert": token_reviews
            .as_ref()
            .filter(|_| total.ok > 0)
            .map(|r| r.total as f64 / total.ok as f64),
    });
    println!(
        "{:<40} conc {:>5} ({}x{}) {:>9.1} cert/s  p50 {:>7.2} ms  p90 {:>7.2}  p99 {:>7.2}  p99.9 {:>7.2}  errors {:?}  cpu/1000 {}  peak RSS {}  verified {}",
        args.target.label,
        args.connections * args.streams,
        args.connections,
        args.streams,
        throughput,
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        total.errors,
        cpu_per_1000.map_or("-".into(), |c| format!("{c:.3}s")),
        peak_rss.map_or("-".into(), |r| format!("{r:.1} MiB")),
        total.verified,
    );
    if let Some(r) = &token_reviews {
        println!(
            "{:<40} TokenReviews on the API server: {} ({} not 201) for {} certificates",
            args.target.label, r.total, r.failed, total.ok
        );
    }
    if let Some(first) = total.verify_failures.first() {
        return Err(format!(
            "{} answers failed verification, e.g.: {first}",
            total.verify_failures.len()
        ));
    }
    if let Some(path) = &args.target.json {
        crate::append_json(path, &result)?;
    }
    Ok(())
}
