//! `abuse`: hostile clients against a running CA, one attack per
//! invocation, with legitimate renewals running alongside; `abuse-report`
//! turns the results into a Markdown table and checks the targets.
//! `bench/abuse` starts a fresh server (default limits) for each attack.
//!
//! Each invocation: the legitimate load starts (`legit`: 200 renewals/s over
//! 4 connections, plus a renewal on a fresh connection every 500 ms), warms
//! up, runs alone for the baseline, then the attack runs for its duration
//! from one attacker thread (one current-thread tokio runtime), then stops
//! (every attacking socket closed) and the load runs on while the server
//! settles. Server RSS (VmRSS) and open fds are sampled every 200 ms.
//!
//! The attacks, all against the server's address on loopback, from source
//! address 127.0.0.2 (the three connection-holding attacks from 127.0.0.2 to
//! 127.0.0.17: their reconnect churn needs the port space); the legitimate
//! clients use 127.0.0.1. Attacks with valid credentials use the second half
//! of the request pool, the legitimate load the first: disjoint identities,
//! so a per-caller budget the attacker exhausts is never a legitimate one's,
//! and many of them (a node's worth of stolen tokens, or more), so per-caller
//! budgets alone cannot be what stops an attack:
//!
//! 1. `idle-tcp`: many TCP connections that never send a byte; a connection
//!    the server closes is replaced after 0.5-1.5 s. Holds handshake and
//!    connection slots, file descriptors and socket buffers.
//! 2. `idle-h2`: many connections that complete TLS and HTTP/2 and then sit
//!    idle, answering PINGs (the h2 client does), replaced likewise when
//!    closed. Holds the per-connection TLS and h2 state.
//! 3. `slow-handshake`: many connections that send the first 16 bytes of a
//!    real ClientHello and then one more byte every 0.5-1.5 s (slowloris on
//!    the handshake: never idle, never done).
//! 4. `no-token-flood`: CreateCertificate with a valid CSR and no
//!    authorization, 128 streams in flight on each of 4 connections, as fast
//!    as answers come; each should be refused UNAUTHENTICATED.
//!    `forged-token-flood` is the same with a pool token whose signature is
//!    broken (right issuer and key id), so each refusal costs the server a
//!    signature check.
//! 5. `rapid-reset` (CVE-2023-44487): on one connection, HEADERS for a new
//!    stream (no token) immediately followed by RST_STREAM(CANCEL), in
//!    batches of 100 pairs, as fast as the connection takes them; a new
//!    connection when the server closes one. Frames written by hand.
//! 6. `late-reset`: valid requests (pool token and CSR) on every stream slot
//!    the server allows, each reset 50-100 ms after it was sent unless
//!    answered by then, on 2 connections, reconnecting when closed: the
//!    server is made to accept, and start, work that is then thrown away.
//! 7. `continuation-flood`: HEADERS without END_HEADERS, then 16 KiB
//!    CONTINUATION frames of header fields forever, on several connections,
//!    reconnecting when closed. Frames written by hand over tokio-rustls.
//! 8. `held-streams`: HEADERS of a valid call (token, gRPC content type)
//!    with no END_STREAM and no DATA, as many as the server allows per
//!    connection, on many connections, each held until the server ends it
//!    and then replaced at once (a refusal too: the attacker keeps asking
//!    for the slot). `held-partial-bodies` also sends all but 1 KiB of a
//!    message announced just under the size limit on each held stream (the
//!    server buffers ~64 KiB per stream while it waits for the rest).
//! 9. Oversized and malformed requests: `oversized-body` (a 1 MiB message,
//!    16 × the default limit, sent within flow control), `huge-headers`
//!    (header lists of ~190 KiB of small fields or one 256 KiB field, over
//!    HEADERS + CONTINUATION, written by hand because h2 will not send a
//!    header list over the server's advertised limit) and `nested-protobuf`
//!    (`metadata`, a google.protobuf.Struct, nested thousands of levels
//!    deep, hand-encoded, as deep as fits the size limit).
//!
//! Targets (checked by `abuse-report`): every legitimate renewal succeeds
//! (steady and fresh connections, in every phase); the legitimate p99
//! during the attack is at most max(3 × the baseline p99, baseline p99 +
//! 5 ms) (the floor keeps a sub-millisecond baseline from turning scheduler
//! noise into failures); server RSS at the end of the settle time is within
//! 10 MiB of its value when the attack started; the server is still running.
//!
//! Measuring the server, not the machine: the attacker has a core of its own
//! (`--attacker-cpu`; bench/abuse gives it CPU 0 and runs the server and the
//! legitimate load on CPU 1), as "one attacking core" means. On loopback the
//! kernel handles a packet on the sender's CPU, so the attack's connection
//! and packet work stays on the attacker's core too. Sharing the server's CPU
//! costs the legitimate load a little of the server's time, never the other
//! way round: the load's thread runs at nice -10 (the attacker's at -5, for
//! machines where they share a CPU), and the load reports its own scheduling
//! lag per phase (`max_client_lag_ms`). `bench/abuse` runs the server and this process
//! each in a session of its own whose scheduling group is at nice -10 (with
//! autogroup scheduling, per-thread nice values only order threads within a
//! session). The server's run-queue wait and what other processes took from
//! each CPU are recorded per phase; `abuse-report` marks a latency miss as
//! "contended" when, during the attack, the server waited for its CPU while
//! other processes held it.

mod attacks;
mod legit;
mod report;
mod wire;

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::json;

use meshsign::client::CaEndpoint;

use crate::{load, pool, procstat};

pub use report::{report, ReportArgs};

/// The attacks (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Attack {
    IdleTcp,
    IdleH2,
    SlowHandshake,
    NoTokenFlood,
    ForgedTokenFlood,
    RapidReset,
    LateReset,
    ContinuationFlood,
    HeldStreams,
    HeldPartialBodies,
    OversizedBody,
    HugeHeaders,
    NestedProtobuf,
}

impl Attack {
    pub fn name(self) -> String {
        self.to_possible_value()
            .map_or_else(|| format!("{self:?}"), |v| v.get_name().to_owned())
    }

    /// Source addresses the attack comes from by default (see
    /// `--attack-sources`).
    fn sources(self) -> usize {
        match self {
            Attack::IdleTcp | Attack::IdleH2 | Attack::SlowHandshake => 16,
            _ => 1,
        }
    }

    /// (connections, streams per connection) for a full or smoke run.
    fn shape(self, smoke: bool) -> (usize, usize) {
        use Attack::*;
        match (self, smoke) {
            (IdleTcp, false) => (10_000, 0),
            (IdleTcp, true) => (3_000, 0),
            (IdleH2, false) => (10_000, 0),
            (IdleH2, true) => (2_000, 0),
            (SlowHandshake, false) => (5_000, 0),
            (SlowHandshake, true) => (2_000, 0),
            (NoTokenFlood | ForgedTokenFlood, _) => (4, 128),
            (RapidReset, _) => (1, 0),
            (LateReset, _) => (2, 1024),
            (ContinuationFlood, false) => (16, 0),
            (ContinuationFlood, true) => (4, 0),
            (HeldStreams, false) => (32, 1024),
            (HeldStreams, true) => (4, 1024),
            (HeldPartialBodies, false) => (8, 1024),
            (HeldPartialBodies, true) => (2, 1024),
            (OversizedBody, _) => (4, 32),
            (HugeHeaders, _) => (4, 0),
            (NestedProtobuf, _) => (4, 64),
        }
    }
}

#[derive(Args, Debug)]
pub struct AbuseArgs {
    /// The attack to run (one per invocation: the driver starts a fresh
    /// server for each).
    #[arg(long, value_enum, required_unless_present = "list")]
    attack: Option<Attack>,
    /// Print the attack names, one a line, and exit.
    #[arg(long)]
    list: bool,
    /// CA address, host:port.
    #[arg(long, required_unless_present = "list")]
    addr: Option<String>,
    /// Root certificate(s) for the CA's serving certificate.
    #[arg(long, required_unless_present = "list")]
    root: Option<PathBuf>,
    /// TLS server name.
    #[arg(long, default_value = "istiod.istio-system.svc")]
    server_name: String,
    /// The server's PID (RSS, fds, CPU from /proc; whether it survived).
    #[arg(long, required_unless_present = "list")]
    server_pid: Option<u32>,
    /// The request pool (`meshsign-bench pool`): the legitimate load's
    /// requests, and the credentials of the attacks that use valid ones.
    #[arg(long, required_unless_present = "list")]
    pool: Option<PathBuf>,
    /// Append the result (one JSON object) to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Smaller attacks (fewer connections) for the smoke run.
    #[arg(long)]
    smoke: bool,
    /// Pin the attacker thread to this CPU (the attacker's own core; the
    /// legitimate load stays where the process was started).
    #[arg(long)]
    attacker_cpu: Option<usize>,
    /// Legitimate load before the baseline, not measured.
    #[arg(long, default_value = "1s", value_parser = crate::parse_duration)]
    warmup: Duration,
    /// Legitimate load alone: the baseline.
    #[arg(long, default_value = "5s", value_parser = crate::parse_duration)]
    baseline: Duration,
    /// How long the attack runs.
    #[arg(long, default_value = "20s", value_parser = crate::parse_duration)]
    duration: Duration,
    /// Legitimate load after the attack, before RSS and fds are read again.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    settle: Duration,
    /// Legitimate renewals per second (long-lived connections).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Long-lived legitimate connections.
    #[arg(long, default_value_t = 4)]
    legit_connections: usize,
    /// One legitimate renewal on a fresh connection this often.
    #[arg(long, default_value = "500ms", value_parser = crate::parse_duration)]
    new_connection_every: Duration,
    /// A legitimate renewal not answered within this has failed.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    legit_timeout: Duration,
    /// Override the attack's connection count.
    #[arg(long)]
    connections: Option<usize>,
    /// Override the attack's streams per connection.
    #[arg(long)]
    streams: Option<usize>,
    /// Attacker source addresses, 127.0.0.2 … 127.0.0.(1+N). Default: 16
    /// for the connection-holding attacks (idle-tcp, idle-h2,
    /// slow-handshake: their reconnect churn needs the port space, as the
    /// server's TIME_WAIT sockets block a 4-tuple for a minute), 1 for the
    /// others.
    #[arg(long)]
    attack_sources: Option<usize>,
    /// How many identities (pool entries) the attacks with valid
    /// credentials use. Default: all of the attacker's half of the pool.
    #[arg(long)]
    attack_identities: Option<usize>,
    /// The server's message size limit (its `limits.max_request_bytes`).
    /// Default: meshsign's default, read from the library (bench/abuse runs
    /// the server with every limit at its default).
    #[arg(long)]
    max_request_bytes: Option<usize>,
}

pub fn run(args: AbuseArgs) -> Result<(), String> {
    if args.list {
        for a in Attack::value_variants() {
            println!("{}", a.name());
        }
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(orchestrate(args))
}

// --- server accounting --------------------------------------------------------------

/// One reading of the server.
#[derive(Debug, Clone, Copy, Default)]
struct Reading {
    rss_mib: f64,
    fds: u64,
}

fn read_server(pid: u32) -> Option<Reading> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    let fds = procstat::open_fds(pid)?;
    Some(Reading {
        rss_mib: kib / 1024.0,
        fds,
    })
}

/// CPU accounting for one moment: the server's CPU seconds; the seconds its
/// threads spent runnable but waiting for a CPU (/proc/PID/task/*/schedstat,
/// second field); and, when the server and this process are each pinned to
/// one CPU (bench/abuse pins them), how busy those CPUs were in total, so
/// what *other* processes took from them can be told apart from the attack
/// (this machine may be shared).
#[derive(Debug, Clone, Copy)]
struct CpuReading {
    at: Instant,
    cpu_s: f64,
    wait_s: f64,
    /// Busy seconds of the server's CPU (all processes).
    server_cpu_busy_s: Option<f64>,
    /// This process's CPU seconds, and the busy seconds of its CPU.
    own_cpu_s: Option<f64>,
    own_cpu_busy_s: Option<f64>,
}

/// The only CPU `pid` may run on, if it is pinned to one.
fn pinned_cpu(pid: u32) -> Option<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Busy seconds of CPU `cpu` since boot (/proc/stat: everything but idle and iowait).
fn cpu_busy_s(cpu: usize) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let name = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)? + f.get(7)?;
    Some(busy / 100.0)
}

fn read_cpu(pid: u32) -> Option<CpuReading> {
    let cpu_s = procstat::cpu(pid)?.seconds;
    let mut wait_ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) {
            wait_ns += s
                .split_whitespace()
                .nth(1)
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    let me = std::process::id();
    Some(CpuReading {
        at: Instant::now(),
        cpu_s,
        wait_s: wait_ns as f64 / 1e9,
        server_cpu_busy_s: pinned_cpu(pid).and_then(cpu_busy_s),
        own_cpu_s: procstat::cpu(me).map(|c| c.seconds),
        own_cpu_busy_s: pinned_cpu(me).and_then(cpu_busy_s),
    })
}

/// Between two readings, per second of wall time: the server's CPU, its
/// threads' run-queue wait, what other processes used of the server's CPU,
/// and what processes other than this one used of the load generator's.
fn cpu_between(a: Option<CpuReading>, b: Option<CpuReading>) -> serde_json::Value {
    let (Some(a), Some(b)) = (a, b) else {
        return serde_json::Value::Null;
    };
    let secs = (b.at - a.at).as_secs_f64().max(1e-3);
    let cpu = b.cpu_s - a.cpu_s;
    let others = |busy_a: Option<f64>, busy_b: Option<f64>, own: f64| {
        busy_a
            .zip(busy_b)
            .map(|(x, y)| ((y - x - own) / secs).max(0.0))
    };
    let own = b.own_cpu_s.zip(a.own_cpu_s).map(|(y, x)| y - x);
    json!({
        "cpu_s": cpu,
        "cpu_share": cpu / secs,
        "runqueue_wait_share": (b.wait_s - a.wait_s) / secs,
        "others_on_server_cpu_share": others(a.server_cpu_busy_s, b.server_cpu_busy_s, cpu),
        "others_on_client_cpu_share": own.and_then(|o| others(a.own_cpu_busy_s, b.own_cpu_busy_s, o)),
    })
}

/// Running and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

/// Samples the server every 200 ms and keeps the peaks since `reset`.
struct Sampler {
    peak: Arc<Mutex<Reading>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(Mutex::new(Reading::default()));
        let p = peak.clone();
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(200));
            loop {
                every.tick().await;
                if let Some(r) = read_server(pid) {
                    let mut g = p.lock().unwrap_or_else(|e| e.into_inner());
                    g.rss_mib = g.rss_mib.max(r.rss_mib);
                    g.fds = g.fds.max(r.fds);
                }
            }
        });
        Self { peak, task }
    }

    fn reset(&self, to: Reading) {
        *self.peak.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }

    fn peak(&self) -> Reading {
        *self.peak.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// --- one run --------------------------------------------------------------------------

/// The attacker thread's nice value: below the legitimate load's, so the
/// attacker cannot delay the measuring client on the CPU they share, and
/// above the process's other threads. (Against other processes, what counts
/// under autogroup scheduling is the session's group, which bench/abuse
/// raises.)
const ATTACKER_NICE: i32 = -5;

/// Sets the calling thread's nice value (Linux: per thread); false if not
/// permitted.
pub(crate) fn set_thread_nice(nice: i32) -> bool {
    // SAFETY: plain system calls on the calling thread's own id.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice) == 0
    }
}

/// Pins the calling thread to `cpu`; false if not permitted.
fn pin_thread(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only touch
    // the calling thread's affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Runs the attack on a thread of its own (one current-thread runtime,
/// pinned to `cpu` when given) and returns once it has stopped and its
/// runtime, with every socket it held, is gone.
async fn run_attacker(
    attack: Attack,
    ctx: Arc<attacks::Ctx>,
    cpu: Option<usize>,
) -> Result<bool, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("attacker".into())
        .spawn(move || {
            if let Some(cpu) = cpu {
                if !pin_thread(cpu) {
                    eprintln!("warning: cannot pin the attacker to CPU {cpu}");
                }
            }
            let raised = set_thread_nice(ATTACKER_NICE);
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| {
                    rt.block_on(attacks::run(attack, ctx));
                    rt.shutdown_timeout(Duration::from_secs(2));
                    raised
                })
                .map_err(|e| e.to_string());
            let _ = tx.send(result);
        })
        .map_err(|e| e.to_string())?;
    rx.await
        .map_err(|_| "the attacker thread died".to_owned())?
}

/// meshsign's default `limits.max_request_bytes` (the attacks that size
/// their messages to the limit must use the server's, not a copy of it).
fn server_default_max_request_bytes() -> Result<usize, String> {
    meshsign::config::Config::from_yaml("{}")
        .map(|c| c.limits.max_request_bytes)
        .map_err(|e| format!("meshsign's default configuration: {e}"))
}

async fn orchestrate(args: AbuseArgs) -> Result<(), String> {
    let missing = |what: &str| format!("--{what} is required");
    let attack = args.attack.ok_or_else(|| missing("attack"))?;
    let addr_s = args.addr.clone().ok_or_else(|| missing("addr"))?;
    let root = args.root.clone().ok_or_else(|| missing("root"))?;
    let pid = args.server_pid.ok_or_else(|| missing("server-pid"))?;
    let pool_path = args.pool.clone().ok_or_else(|| missing("pool"))?;

    // Disjoint identities: the first half of the pool is the legitimate
    // workloads', the second half the attacker's (stolen or its own), so a
    // per-caller budget the attacker exhausts is never a legitimate one's.
    let mut entries = pool::load(&pool_path)?;
    if entries.len() < 2 {
        return Err("the pool needs at least 2 entries".into());
    }
    let attacker_entries = entries.split_off(entries.len() / 2);
    let creds: Vec<(String, String)> = attacker_entries
        .iter()
        .take(args.attack_identities.unwrap_or(usize::MAX).max(1))
        .map(|e| (e.token.clone(), e.csr.clone()))
        .collect();
    let creds_len = creds.len();
    let prepared = Arc::new(load::prepare(entries)?);
    let root_pem = std::fs::read(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let ep = CaEndpoint {
        addr: addr_s.clone(),
        server_name: Some(args.server_name.clone()),
        roots: meshsign::pki::parse_certificates_nonempty(&root_pem).map_err(|e| e.to_string())?,
        client_identity: None,
    };
    let addr = addr_s
        .to_socket_addrs()
        .map_err(|e| format!("{addr_s}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr_s}: no address"))?;
    let dialer = wire::Dialer::new(
        addr,
        args.attack_sources.unwrap_or(attack.sources()),
        meshsign::client::client_tls_config(&ep)?,
        &args.server_name,
    )?;
    let max_request_bytes = match args.max_request_bytes {
        Some(n) => n,
        None => server_default_max_request_bytes()?,
    };
    let (def_conns, def_streams) = attack.shape(args.smoke);
    let connections = args.connections.unwrap_or(def_conns);
    let streams = args.streams.unwrap_or(def_streams);

    let legit = legit::Legit::start(
        ep,
        prepared,
        legit::LegitConfig {
            rate: args.rate,
            connections: args.legit_connections,
            new_connection_every: args.new_connection_every,
            timeout: args.legit_timeout,
            ttl: 3600,
            verify_every: 50,
        },
    )
    .await?;
    let sampler = Sampler::start(pid);
    tokio::time::sleep(args.warmup).await;
    legit.set_phase(legit::Phase::Before);
    let cpu0 = read_cpu(pid);
    tokio::time::sleep(args.baseline).await;

    // The attack.
    let start = read_server(pid).ok_or("cannot read the server's /proc entries")?;
    let cpu1 = read_cpu(pid);
    sampler.reset(start);
    legit.set_phase(legit::Phase::During);
    let stats = Arc::new(wire::Stats::default());
    let ctx = Arc::new(attacks::Ctx {
        dialer,
        pool: creds,
        deadline: Instant::now() + args.duration,
        stats: stats.clone(),
        connections,
        streams,
        max_request_bytes,
    });
    let attack_started = Instant::now();
    let attacker = run_attacker(attack, ctx, args.attacker_cpu).await;
    let attack_secs = attack_started.elapsed().as_secs_f64();
    let cpu2 = read_cpu(pid);
    let end_of_attack = read_server(pid);

    // Settle.
    legit.set_phase(legit::Phase::After);
    tokio::time::sleep(args.settle).await;
    let after = read_server(pid);
    let cpu3 = read_cpu(pid);
    let peak = sampler.peak();
    drop(sampler);
    let priority_raised = legit.priority_raised;
    let results = legit.finish().await?;
    let server_alive = alive(pid);

    // Verdicts.
    let [warm, before, during, after_ph] = [0, 1, 2, 3].map(|i| &results[i]);
    let legit_failed: u64 = results.iter().map(|s| s.failed_total()).sum();
    let legit_ok: u64 = results.iter().map(|s| s.ok + s.new_ok).sum();
    let p99_before = before.p99_ms();
    let p99_during = during.p99_ms();
    let p99_limit = p99_before.map(|b| (3.0 * b).max(b + 5.0));
    let p99_ok = matches!((p99_during, p99_limit), (Some(d), Some(l)) if d <= l);
    let rss_ok = after.is_some_and(|a| a.rss_mib <= start.rss_mib + 10.0);
    let snapshot = stats.snapshot();
    let record = json!({
        "attack": attack.name(),
        "mode": if args.smoke { "smoke" } else { "full" },
        "durations_s": {
            "warmup": args.warmup.as_secs_f64(),
            "baseline": args.baseline.as_secs_f64(),
            "attack": attack_secs,
            "settle": args.settle.as_secs_f64(),
        },
        "attack_shape": {
            "connections": connections,
            "streams": streams,
            "source_addresses": args.attack_sources.unwrap_or(attack.sources()),
            "identities": creds_len,
        },
        "attacker_error": attacker.as_ref().err(),
        "attacker_priority_raised": attacker.as_ref().ok(),
        "attacker": {
            "counts": snapshot.counts,
            "peaks": snapshot.gauges.iter().map(|(k, v)| (k.clone(), v.1)).collect::<std::collections::BTreeMap<_, _>>(),
            // Gauges when the attack stopped (e.g. connections the server
            // still held: they never show up among the closes).
            "at_end": snapshot.gauges.iter().map(|(k, v)| (k.clone(), v.0)).collect::<std::collections::BTreeMap<_, _>>(),
            "maxima": snapshot.maxima,
        },
        "legit": {
            "rate": args.rate,
            "connections": args.legit_connections,
            "new_connection_every_s": args.new_connection_every.as_secs_f64(),
            "priority_raised": priority_raised,
            "warmup": warm.to_json(),
            "before": before.to_json(),
            "during": during.to_json(),
            "after": after_ph.to_json(),
            "ok": legit_ok,
            "failed": legit_failed,
        },
        "server": {
            "alive": server_alive,
            "rss_mib": {
                "start": start.rss_mib,
                "peak": peak.rss_mib,
                "end_of_attack": end_of_attack.map(|r| r.rss_mib),
                "after": after.map(|r| r.rss_mib),
            },
            "fds": {
                "start": start.fds,
                "peak": peak.fds,
                "end_of_attack": end_of_attack.map(|r| r.fds),
                "after": after.map(|r| r.fds),
            },
            "cpu": {
                "before": cpu_between(cpu0, cpu1),
                "during": cpu_between(cpu1, cpu2),
                "after": cpu_between(cpu2, cpu3),
            },
        },
        "targets": {
            "legit_all_ok": legit_failed == 0,
            "p99_limit_ms": p99_limit,
            "p99_ok": p99_ok,
            "rss_ok": rss_ok,
            "alive": server_alive,
        },
    });
    let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
    println!(
        "{:<20} legit ok {} failed {} | p99 before {} during {} (limit {}) after {} ms | RSS {:.1} → peak {:.1} → {} MiB | fds {} → {} → {} | alive {}",
        attack.name(),
        legit_ok,
        legit_failed,
        f(p99_before),
        f(p99_during),
        f(p99_limit),
        f(after_ph.p99_ms()),
        start.rss_mib,
        peak.rss_mib,
        f(after.map(|r| r.rss_mib)),
        start.fds,
        peak.fds,
        after.map_or("-".into(), |r| r.fds.to_string()),
        server_alive,
    );
    if let Some(path) = &args.json {
        crate::append_json(path, &record)?;
    }
    Ok(())
}
