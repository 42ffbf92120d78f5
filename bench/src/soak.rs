//! A bounded soak: a steady open-loop rate of good renewals and bad requests
//! against a running CA for a fixed time, sampling the server's resident
//! memory, open files and threads from /proc as it goes.
//!
//! Good renewals go over a few long-lived connections (as sidecars renew),
//! plus one on a fresh connection every so often. Bad requests, one in
//! `1 / bad_fraction`, cycle through five kinds, each with the one code the
//! server documents for it: no token (`UNAUTHENTICATED`), a forged token
//! (`UNAUTHENTICATED`), a CSR that does not parse (`INVALID_ARGUMENT`), a CSR
//! for another identity than the token's (`PERMISSION_DENIED`) and a message
//! over `limits.max_request_bytes` (`RESOURCE_EXHAUSTED`). They come over
//! connections of their own, each from its own loopback source address, so
//! that with the default limits no bad client's budgets (refusals per
//! connection, failed authentications per address) are spent: every bad
//! request reaches the check it is meant to fail.
//!
//! The run fails if a good request failed, a bad request got any other code
//! than its own, or memory or open files grew: after the warm-up, the
//! largest RSS of the last third of the samples may exceed the largest of
//! the first third by at most `rss_slack_mib`, likewise open files by
//! `fd_slack`; and once the load has stopped and its connections are closed,
//! open files must be back within `fd_slack` of where they were before it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint, Uri};

use meshsign::client::{self, CaEndpoint};
use meshsign::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use meshsign::proto::IstioCertificateRequest;

use crate::load::{call, Prepared};
use crate::{pool, Target};

#[derive(Args, Debug)]
pub struct SoakArgs {
    #[command(flatten)]
    target: Target,
    /// How long the load runs.
    #[arg(long, default_value = "10m", value_parser = crate::parse_duration)]
    duration: Duration,
    /// Requests per second, good and bad together.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Share of the requests that are bad (0 to 0.5).
    #[arg(long, default_value_t = 0.2)]
    bad_fraction: f64,
    /// Long-lived connections for the good renewals.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Connections for the bad requests, each from its own loopback address
    /// (127.0.0.2, 127.0.0.3, ...).
    #[arg(long, default_value_t = 4)]
    bad_connections: usize,
    /// One good renewal on a fresh connection this often.
    #[arg(long, default_value = "500ms", value_parser = crate::parse_duration)]
    new_connection_every: Duration,
    /// How often the server's RSS, open files and threads are sampled.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    sample_every: Duration,
    /// Samples taken before this much of the run are not judged (allocator
    /// pools and caches filling); default: a fifth of the duration, at most 60s.
    #[arg(long, value_parser = crate::parse_duration)]
    warmup: Option<Duration>,
    /// Allowed growth of the largest RSS from the first to the last third.
    #[arg(long, default_value_t = 16.0)]
    rss_slack_mib: f64,
    /// Allowed growth of open files (first to last third; and after the load
    /// compared with before it).
    #[arg(long, default_value_t = 8)]
    fd_slack: i64,
    /// A request not answered within this counts as failed.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    timeout: Duration,
    /// Verify every Nth good answer (chain to the root, SAN, key).
    #[arg(long, default_value_t = 10)]
    verify_every: u64,
    /// Write the report here (Markdown).
    #[arg(long)]
    markdown: Option<std::path::PathBuf>,
    /// A line for the report saying how it was run.
    #[arg(long)]
    note: Option<String>,
}

/// The kinds of request, and the code each must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Good,
    NoToken,
    ForgedToken,
    BadCsr,
    WrongIdentity,
    Oversized,
}

const BAD: [Kind; 5] = [
    Kind::NoToken,
    Kind::ForgedToken,
    Kind::BadCsr,
    Kind::WrongIdentity,
    Kind::Oversized,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Good => "good renewal",
            Kind::NoToken => "no token",
            Kind::ForgedToken => "forged token",
            Kind::BadCsr => "CSR that does not parse",
            Kind::WrongIdentity => "CSR for another identity",
            Kind::Oversized => "message over max_request_bytes",
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Kind::Good => "OK",
            Kind::NoToken | Kind::ForgedToken => "Unauthenticated",
            Kind::BadCsr => "InvalidArgument",
            Kind::WrongIdentity => "PermissionDenied",
            Kind::Oversized => "ResourceExhausted",
        }
    }
}

/// One sample of the server process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_mib: f64,
    fds: i64,
    threads: i64,
    /// Requests answered by then.
    done: u64,
}

fn sample(pid: u32, at: Duration, done: u64) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let fds = crate::procstat::open_fds(pid)? as i64;
    Some(Sample {
        at,
        rss_mib: field("VmRSS:")? / 1024.0,
        fds,
        threads: field("Threads:")? as i64,
        done,
    })
}

/// Counts of one kind of request: by outcome (`OK` or the code's name).
type Outcomes = BTreeMap<Kind, BTreeMap<String, u64>>;

/// A TLS channel whose TCP connections come from `source`.
async fn channel_from(
    ep: &CaEndpoint,
    tls: Arc<rustls::ClientConfig>,
    source: Option<Ipv4Addr>,
) -> Result<Channel, String> {
    let Some(source) = source else {
        return client::channel_with_tls(ep, tls).await;
    };
    let addr: SocketAddr = tokio::net::lookup_host(ep.addr.as_str())
        .await
        .map_err(|e| format!("{}: {e}", ep.addr))?
        .find(|a| a.is_ipv4())
        .ok_or_else(|| format!("{}: no IPv4 address", ep.addr))?;
    let name = ep
        .server_name
        .clone()
        .unwrap_or_else(|| ep.addr.rsplit_once(':').map_or("", |(h, _)| h).to_owned());
    let server_name = rustls_pki_types::ServerName::try_from(name.clone())
        .map_err(|e| format!("server name {name:?}: {e}"))?;
    let connector = tower::service_fn(move |_: Uri| {
        let (tls, server_name) = (tls.clone(), server_name.clone());
        async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
            let tcp = socket.connect(addr).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    Endpoint::from_shared(format!("http://{}", ep.addr))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("connect {} from {source}: {e}", ep.addr))
}

/// Flips a character of a token's signature.
fn forge(token: &str) -> String {
    let mut t = token.as_bytes().to_vec();
    let i = t.len() - 10;
    t[i] = if t[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(t).expect("ASCII")
}

/// The bad request of `kind` made from pool entries `p` and `other`.
fn bad_request(
    kind: Kind,
    p: &Prepared,
    other: &Prepared,
    ttl: i64,
) -> tonic::Request<IstioCertificateRequest> {
    let csr = match kind {
        Kind::BadCsr => {
            "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgQ1NS\n-----END CERTIFICATE REQUEST-----\n"
                .to_owned()
        }
        Kind::WrongIdentity => other.csr.clone(),
        // Well over the default 32 KiB.
        Kind::Oversized => format!("{}{}", p.csr, "A".repeat(40 * 1024)),
        _ => p.csr.clone(),
    };
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: ttl,
        metadata: None,
    });
    let token = p.auth.to_str().unwrap_or_default();
    match kind {
        Kind::NoToken => {}
        Kind::ForgedToken => {
            if let Ok(v) = MetadataValue::try_from(forge(token)) {
                req.metadata_mut().insert("authorization", v);
            }
        }
        _ => {
            req.metadata_mut().insert("authorization", p.auth.clone());
        }
    }
    req
}

struct Done {
    kind: Kind,
    outcome: String,
    verified: bool,
    latency: Duration,
}

pub fn run(args: SoakArgs) -> Result<(), String> {
    let pid = args
        .target
        .server_pid
        .ok_or("--server-pid is needed: the soak samples the server's memory and files")?;
    if !(0.0..=0.5).contains(&args.bad_fraction) {
        return Err("--bad-fraction must be within 0 and 0.5".into());
    }
    let pool = Arc::new(crate::load::prepare(pool::load(&args.target.pool)?)?);
    if pool.len() < 2 {
        return Err("the pool needs at least two entries".into());
    }
    let ep = crate::load::endpoint(&args.target)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (outcomes, samples, before, after, verified, slowest) =
        rt.block_on(drive(&args, ep, pool, pid))?;
    drop(rt);
    judge(&args, &outcomes, &samples, before, after, verified, slowest)
}

type Driven = (Outcomes, Vec<Sample>, Sample, Sample, u64, Duration);

async fn drive(
    args: &SoakArgs,
    ep: CaEndpoint,
    pool: Arc<Vec<Prepared>>,
    pid: u32,
) -> Result<Driven, String> {
    let started = Instant::now();
    let before = sample(pid, Duration::ZERO, 0).ok_or("cannot read the server's /proc entry")?;
    let tls = Arc::new(client::client_tls_config(&ep)?);
    let mut good = Vec::new();
    for _ in 0..args.connections.max(1) {
        good.push(IstioCertificateServiceClient::new(
            channel_from(&ep, tls.clone(), None).await?,
        ));
    }
    let mut bad = Vec::new();
    for i in 0..args.bad_connections.max(1) {
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i % 250) as u8);
        bad.push(IstioCertificateServiceClient::new(
            channel_from(&ep, tls.clone(), Some(source)).await?,
        ));
    }

    let mut outcomes: Outcomes = BTreeMap::new();
    let mut samples = Vec::new();
    let mut verified = 0u64;
    let mut slowest = Duration::ZERO;
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate.max(0.1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut fresh_tick = tokio::time::interval(args.new_connection_every);
    fresh_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sample_tick = tokio::time::interval(args.sample_every);
    let every_bad = if args.bad_fraction > 0.0 {
        (1.0 / args.bad_fraction).round().max(2.0) as u64
    } else {
        u64::MAX
    };
    let end = tokio::time::Instant::now() + args.duration;
    let (mut k, mut n_bad, mut n_good, mut answered) = (0u64, 0usize, 0u64, 0u64);
    let mut last_report = Instant::now();
    let ttl = 3600;
    let record = |outcomes: &mut Outcomes,
                  verified: &mut u64,
                  slowest: &mut Duration,
                  answered: &mut u64,
                  d: Result<Done, tokio::task::JoinError>| {
        *answered += 1;
        let d = d.unwrap_or(Done {
            kind: Kind::Good,
            outcome: "task panicked".into(),
            verified: false,
            latency: Duration::ZERO,
        });
        *verified += u64::from(d.verified);
        if d.kind == Kind::Good {
            *slowest = (*slowest).max(d.latency);
        }
        *outcomes
            .entry(d.kind)
            .or_default()
            .entry(d.outcome)
            .or_default() += 1;
    };
    loop {
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(end) => break,
            _ = sample_tick.tick() => {
                if let Some(s) = sample(pid, started.elapsed(), answered) {
                    samples.push(s);
                } else {
                    return Err(format!("the server (pid {pid}) is gone"));
                }
                if last_report.elapsed() >= Duration::from_secs(60) {
                    last_report = Instant::now();
                    let s = samples.last().expect("just pushed");
                    eprintln!(
                        "soak: {:>4.0} s, {} answered, RSS {:.1} MiB, {} open files, {} threads",
                        s.at.as_secs_f64(), s.done, s.rss_mib, s.fds, s.threads
                    );
                }
            }
            _ = tick.tick() => {
                let i = k as usize;
                k += 1;
                let (kind, mut c) = if k % every_bad == 0 {
                    let kind = BAD[n_bad % BAD.len()];
                    n_bad += 1;
                    (kind, bad[n_bad % bad.len()].clone())
                } else {
                    (Kind::Good, good[i % good.len()].clone())
                };
                let pool = pool.clone();
                let timeout = args.timeout;
                let verify = kind == Kind::Good && args.verify_every > 0 && {
                    n_good += 1;
                    n_good % args.verify_every == 0
                };
                tasks.spawn(async move {
                    let p = &pool[i % pool.len()];
                    let t0 = Instant::now();
                    let (outcome, verified) = if kind == Kind::Good {
                        match tokio::time::timeout(timeout, call(&mut c, p, ttl)).await {
                            Ok(Ok(chain)) => check(verify, &chain, p),
                            Ok(Err(code)) => (code, false),
                            Err(_) => ("timeout".into(), false),
                        }
                    } else {
                        let other = &pool[(i + 1) % pool.len()];
                        let req = bad_request(kind, p, other, ttl);
                        match tokio::time::timeout(timeout, c.create_certificate(req)).await {
                            Ok(Ok(_)) => ("OK".into(), false),
                            Ok(Err(s)) => (format!("{:?}", s.code()), false),
                            Err(_) => ("timeout".into(), false),
                        }
                    };
                    Done { kind, outcome, verified, latency: t0.elapsed() }
                });
            }
            _ = fresh_tick.tick() => {
                let i = k as usize;
                k += 1;
                let (ep, tls, pool, timeout) = (ep.clone(), tls.clone(), pool.clone(), args.timeout);
                tasks.spawn(async move {
                    let p = &pool[i % pool.len()];
                    let t0 = Instant::now();
                    let attempt = async {
                        let ch = client::channel_with_tls(&ep, tls)
                            .await
                            .map_err(|_| "connect failed".to_owned())?;
                        call(&mut IstioCertificateServiceClient::new(ch), p, ttl).await
                    };
                    let (outcome, verified) = match tokio::time::timeout(timeout, attempt).await {
                        Ok(Ok(chain)) => check(true, &chain, p),
                        Ok(Err(e)) => (e, false),
                        Err(_) => ("timeout".into(), false),
                    };
                    Done { kind: Kind::Good, outcome, verified, latency: t0.elapsed() }
                });
            }
            Some(d) = tasks.join_next() => record(&mut outcomes, &mut verified, &mut slowest, &mut answered, d),
        }
    }
    while let Some(d) = tasks.join_next().await {
        record(&mut outcomes, &mut verified, &mut slowest, &mut answered, d);
    }
    // Close every connection, give the server a moment to see them go,
    // then the last sample: open files back where they were before the load.
    drop(good);
    drop(bad);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = sample(pid, started.elapsed(), answered)
        .ok_or_else(|| format!("the server (pid {pid}) is gone"))?;
    Ok((outcomes, samples, before, after, verified, slowest))
}

fn check(verify: bool, chain: &[String], p: &Prepared) -> (String, bool) {
    if !verify {
        return ("OK".into(), false);
    }
    match client::verify_issued(chain, &p.identity, ::time::OffsetDateTime::now_utc()) {
        Ok(_) => ("OK".into(), true),
        Err(e) => (format!("answer failed verification: {e}"), false),
    }
}

fn max_by(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    samples.iter().map(f).fold(f64::MIN, f64::max)
}

fn judge(
    args: &SoakArgs,
    outcomes: &Outcomes,
    samples: &[Sample],
    before: Sample,
    after: Sample,
    verified: u64,
    slowest: Duration,
) -> Result<(), String> {
    let warmup = args
        .warmup
        .unwrap_or_else(|| (args.duration / 5).min(Duration::from_secs(60)));
    let judged: Vec<Sample> = samples.iter().copied().filter(|s| s.at >= warmup).collect();
    let mut problems = Vec::new();
    if judged.len() < 3 {
        problems.push(format!(
            "only {} samples after the warm-up: run longer or sample more often",
            judged.len()
        ));
    }
    let third = (judged.len() / 3).max(1);
    let (first, last) = (
        &judged[..third.min(judged.len())],
        &judged[judged.len().saturating_sub(third)..],
    );
    let rss_growth = max_by(last, |s| s.rss_mib) - max_by(first, |s| s.rss_mib);
    let fd_growth = max_by(last, |s| s.fds as f64) - max_by(first, |s| s.fds as f64);
    let fds_after = after.fds - before.fds;
    if rss_growth > args.rss_slack_mib {
        problems.push(format!(
            "memory grew: the last third's largest RSS is {rss_growth:.1} MiB above the first third's (allowed {:.1})",
            args.rss_slack_mib
        ));
    }
    if fd_growth > args.fd_slack as f64 {
        problems.push(format!(
            "open files grew by {fd_growth} from the first third to the last (allowed {})",
            args.fd_slack
        ));
    }
    if fds_after > args.fd_slack {
        problems.push(format!(
            "open files did not come back: {} before the load, {} after it (allowed +{})",
            before.fds, after.fds, args.fd_slack
        ));
    }
    let count = |kind: Kind, want: bool| -> u64 {
        outcomes.get(&kind).map_or(0, |m| {
            m.iter()
                .filter(|(o, _)| (o.as_str() == kind.expected()) == want)
                .map(|(_, n)| n)
                .sum()
        })
    };
    let mut rows = Vec::new();
    let mut good_failed = 0;
    let mut bad_unexpected = 0;
    for kind in std::iter::once(Kind::Good).chain(BAD) {
        let (ok, wrong) = (count(kind, true), count(kind, false));
        if kind == Kind::Good {
            good_failed = wrong;
        } else {
            bad_unexpected += wrong;
        }
        let others: Vec<String> = outcomes
            .get(&kind)
            .map(|m| {
                m.iter()
                    .filter(|(o, _)| o.as_str() != kind.expected())
                    .map(|(o, n)| format!("{o}: {n}"))
                    .collect()
            })
            .unwrap_or_default();
        rows.push((kind, ok, wrong, others));
    }
    if count(Kind::Good, true) == 0 {
        problems.push("no good request succeeded".into());
    }
    if good_failed > 0 {
        problems.push(format!("{good_failed} good requests failed"));
    }
    if bad_unexpected > 0 {
        problems.push(format!(
            "{bad_unexpected} bad requests got another code than their own"
        ));
    }
    for kind in BAD {
        if args.bad_fraction > 0.0 && count(kind, true) + count(kind, false) == 0 {
            problems.push(format!("no {} was sent", kind.name()));
        }
    }
    let at = |s: &Sample| json!({"at_s": s.at.as_secs_f64(), "rss_mib": s.rss_mib, "fds": s.fds, "threads": s.threads});
    let (first_judged, last_judged) = (judged.first().copied(), judged.last().copied());
    let result = json!({
        "label": args.target.label,
        "duration_s": args.duration.as_secs_f64(),
        "rate": args.rate,
        "bad_fraction": args.bad_fraction,
        "warmup_s": warmup.as_secs_f64(),
        "outcomes": outcomes.iter().map(|(k, m)| (k.name().to_owned(), json!(m))).collect::<serde_json::Map<_, _>>(),
        "verified": verified,
        "slowest_good_ms": slowest.as_secs_f64() * 1000.0,
        "before_load": at(&before),
        "after_warmup": first_judged.as_ref().map(at),
        "end_of_load": last_judged.as_ref().map(at),
        "after_load": at(&after),
        "rss_growth_mib": rss_growth,
        "fd_growth": fd_growth,
        "samples": samples.iter().map(at).collect::<Vec<_>>(),
        "problems": problems,
    });
    if let Some(path) = &args.target.json {
        crate::append_json(path, &result)?;
    }
    let total: u64 = rows.iter().map(|r| r.1 + r.2).sum();
    let mut md = String::new();
    md.push_str("# meshsign soak\n\n");
    if let Some(note) = &args.note {
        md.push_str(&format!("{note}\n\n"));
    }
    md.push_str(&format!(
        "{} at {} requests/s ({:.0}% bad, cycling through five kinds), {} long-lived connections for \
         good renewals plus one fresh connection every {}, {} connections for bad requests (each from its \
         own loopback address). The server's RSS, open files and threads sampled every {} from /proc; \
         samples in the first {} (warm-up) are not judged. Flat means: the last third's largest RSS at \
         most {:.0} MiB above the first third's, open files at most {} above, and open files within {} of \
         the count before the load once its connections are closed.\n\n",
        humantime::format_duration(args.duration),
        args.rate,
        args.bad_fraction * 100.0,
        args.connections,
        humantime::format_duration(args.new_connection_every),
        args.bad_connections,
        humantime::format_duration(args.sample_every),
        humantime::format_duration(warmup),
        args.rss_slack_mib,
        args.fd_slack,
        args.fd_slack,
    ));
    md.push_str(&format!(
        "**{}**: {total} requests answered; {} good renewals, {} failed (slowest {:.1} ms, {} answers verified); {} bad requests, {} with another code than their own.\n\n",
        if problems.is_empty() { "PASS" } else { "FAIL" },
        count(Kind::Good, true) + good_failed,
        good_failed,
        slowest.as_secs_f64() * 1000.0,
        verified,
        rows.iter().skip(1).map(|r| r.1 + r.2).sum::<u64>(),
        bad_unexpected,
    ));
    md.push_str("| Request | Expected | As expected | Otherwise |\n|---|---|---|---|\n");
    for (kind, ok, _, others) in &rows {
        md.push_str(&format!(
            "| {} | `{}` | {ok} | {} |\n",
            kind.name(),
            kind.expected(),
            if others.is_empty() {
                "0".to_owned()
            } else {
                others.join(", ")
            }
        ));
    }
    md.push_str("\n| Server | Before the load | After the warm-up | End of the load | After the load (connections closed) |\n|---|---|---|---|---|\n");
    let cell = |s: Option<Sample>, f: &dyn Fn(&Sample) -> String| s.map_or("—".into(), |s| f(&s));
    let rss = |s: &Sample| format!("{:.1} MiB ({:.0} s)", s.rss_mib, s.at.as_secs_f64());
    let fds = |s: &Sample| s.fds.to_string();
    let threads = |s: &Sample| s.threads.to_string();
    for (name, f) in [
        ("RSS", &rss as &dyn Fn(&Sample) -> String),
        ("Open files", &fds),
        ("Threads", &threads),
    ] {
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} |\n",
            f(&before),
            cell(first_judged, f),
            cell(last_judged, f),
            f(&after)
        ));
    }
    md.push_str(&format!(
        "\nLargest RSS, last third vs first third after the warm-up: {rss_growth:+.1} MiB; open files: {fd_growth:+}; open files after the load vs before: {fds_after:+}.\n",
    ));
    md.push_str("\n| Time | Answered | RSS MiB | Open files | Threads |\n|---|---|---|---|---|\n");
    let step = (samples.len() / 20).max(1);
    for (i, s) in samples.iter().enumerate() {
        if i % step == 0 || i + 1 == samples.len() {
            md.push_str(&format!(
                "| {:.0} s | {} | {:.1} | {} | {} |\n",
                s.at.as_secs_f64(),
                s.done,
                s.rss_mib,
                s.fds,
                s.threads
            ));
        }
    }
    if !problems.is_empty() {
        md.push_str("\nProblems:\n\n");
        for p in &problems {
            md.push_str(&format!("- {p}\n"));
        }
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, &md).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    print!("{md}");
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
