//! The legitimate load that runs alongside every attack: renewals at a
//! steady rate over a few long-lived connections (as sidecars renew), plus a
//! fresh connection every so often that makes one renewal (a workload that
//! has just started or lost its connection), so an attack that keeps new
//! clients out is seen.
//!
//! Open loop: a request is started at every tick whatever the earlier ones
//! are doing (one task per request; HTTP/2 multiplexes them), so a stalled
//! server cannot hide behind a waiting client. Latency is measured from the
//! moment the request is issued, not from the tick: tokio's 1 ms timer would
//! otherwise add up to a millisecond of the client's own lateness to every
//! sample. That lateness ("lag") is recorded per phase instead, so a client
//! starved of CPU by the attacker shows up as lag, not as server latency.
//! The load runs on a thread of its own with a raised scheduling priority
//! (nice -10, when permitted, above the attacker's) for the same reason; it
//! needs a few per cent of the CPU it shares with the attacker.
//!
//! Each request is counted in the phase during which it was scheduled.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;

use meshsign::client::{self, CaEndpoint};
use meshsign::proto::istio_certificate_service_client::IstioCertificateServiceClient;

use crate::load::{call, Prepared};

/// When a request was scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Connections warming up: in the totals, in no percentile shown.
    Warmup = 0,
    /// No attack: the baseline.
    Before = 1,
    /// The attack is running.
    During = 2,
    /// The attack has stopped; the server settles.
    After = 3,
}

pub const PHASES: [Phase; 4] = [Phase::Warmup, Phase::Before, Phase::During, Phase::After];

#[derive(Debug, Clone)]
pub struct LegitConfig {
    /// Renewals per second over the long-lived connections.
    pub rate: f64,
    pub connections: usize,
    /// One renewal on a fresh connection this often.
    pub new_connection_every: Duration,
    /// A renewal not answered within this counts as failed ("timeout").
    pub timeout: Duration,
    pub ttl: i64,
    /// Verify every Nth answer (chain to the root, SAN).
    pub verify_every: u64,
}

/// What one phase saw.
pub struct PhaseStats {
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub failed: BTreeMap<String, u64>,
    pub new_hist: Histogram<u64>,
    pub new_ok: u64,
    pub new_failed: BTreeMap<String, u64>,
    pub max_lag: Duration,
    pub verified: u64,
}

impl PhaseStats {
    fn new() -> Result<Self, String> {
        let h = || Histogram::new_with_bounds(1, 120_000_000, 3).map_err(|e| e.to_string());
        Ok(Self {
            hist: h()?,
            ok: 0,
            failed: BTreeMap::new(),
            new_hist: h()?,
            new_ok: 0,
            new_failed: BTreeMap::new(),
            max_lag: Duration::ZERO,
            verified: 0,
        })
    }

    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum::<u64>() + self.new_failed.values().sum::<u64>()
    }

    fn q(h: &Histogram<u64>, q: f64) -> Option<f64> {
        (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
    }

    pub fn p99_ms(&self) -> Option<f64> {
        Self::q(&self.hist, 0.99)
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "ok": self.ok,
            "failed": self.failed,
            "p50_ms": Self::q(&self.hist, 0.5),
            "p99_ms": Self::q(&self.hist, 0.99),
            "max_ms": (!self.hist.is_empty()).then(|| self.hist.max() as f64 / 1000.0),
            "new_connection_ok": self.new_ok,
            "new_connection_failed": self.new_failed,
            "new_connection_p99_ms": Self::q(&self.new_hist, 0.99),
            "max_client_lag_ms": self.max_lag.as_secs_f64() * 1000.0,
            "verified": self.verified,
        })
    }
}

/// One finished renewal.
struct Done {
    phase: Phase,
    fresh: bool,
    lag: Duration,
    latency: Duration,
    result: Result<bool, String>, // Ok(verified?)
}

/// The running legitimate load.
pub struct Legit {
    phase: Arc<AtomicU8>,
    stop: tokio::sync::watch::Sender<bool>,
    done: tokio::sync::oneshot::Receiver<Result<Vec<PhaseStats>, String>>,
    /// Whether the load's thread got its raised priority.
    pub priority_raised: bool,
}

impl Legit {
    /// Starts the load on its own thread; returns once its connections are up.
    pub async fn start(
        ep: CaEndpoint,
        pool: Arc<Vec<Prepared>>,
        cfg: LegitConfig,
    ) -> Result<Self, String> {
        let phase = Arc::new(AtomicU8::new(Phase::Warmup as u8));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<bool, String>>();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let ph = phase.clone();
        std::thread::Builder::new()
            .name("legit-load".into())
            .spawn(move || {
                let raised = super::set_thread_nice(LEGIT_NICE);
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let result = rt.block_on(run(ep, pool, cfg, ph, stop_rx, ready_tx, raised));
                let _ = done_tx.send(result);
            })
            .map_err(|e| e.to_string())?;
        let priority_raised = ready_rx
            .await
            .map_err(|_| "legitimate load thread ended".to_owned())??;
        Ok(Self {
            phase,
            stop,
            done,
            priority_raised,
        })
    }

    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::SeqCst);
    }

    /// Stops scheduling, waits for the requests in flight (each bounded by
    /// the timeout) and returns the per-phase results, indexed by `Phase`.
    pub async fn finish(self) -> Result<Vec<PhaseStats>, String> {
        let _ = self.stop.send(true);
        self.done
            .await
            .map_err(|_| "legitimate load thread ended".to_owned())?
    }
}

/// The load's thread's nice value (the attacker's is higher: see `abuse`).
pub const LEGIT_NICE: i32 = -10;

async fn run(
    ep: CaEndpoint,
    pool: Arc<Vec<Prepared>>,
    cfg: LegitConfig,
    phase: Arc<AtomicU8>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    ready: tokio::sync::oneshot::Sender<Result<bool, String>>,
    raised: bool,
) -> Result<Vec<PhaseStats>, String> {
    let mut clients = Vec::with_capacity(cfg.connections);
    for _ in 0..cfg.connections.max(1) {
        match client::connect(&ep).await {
            Ok(c) => clients.push(c),
            Err(e) => {
                let _ = ready.send(Err(format!("legitimate load cannot connect: {e}")));
                return Err(e);
            }
        }
    }
    let tls = match client::client_tls_config(&ep) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            let _ = ready.send(Err(e.clone()));
            return Err(e);
        }
    };
    let _ = ready.send(Ok(raised));

    let mut stats = PHASES
        .iter()
        .map(|_| PhaseStats::new())
        .collect::<Result<Vec<_>, _>>()?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / cfg.rate.max(0.1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut fresh_tick = tokio::time::interval(cfg.new_connection_every);
    fresh_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut k = 0usize;
    let current = |phase: &AtomicU8| match phase.load(Ordering::SeqCst) {
        1 => Phase::Before,
        2 => Phase::During,
        3 => Phase::After,
        _ => Phase::Warmup,
    };
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            at = tick.tick() => {
                let ph = current(&phase);
                let mut c = clients[k % clients.len()].clone();
                let pool = pool.clone();
                let (i, timeout, ttl) = (k, cfg.timeout, cfg.ttl);
                let verify = cfg.verify_every > 0 && k as u64 % cfg.verify_every == 0;
                k += 1;
                tasks.spawn(async move {
                    let lag = at.elapsed();
                    let t0 = Instant::now();
                    let p = &pool[i % pool.len()];
                    let result = match tokio::time::timeout(timeout, call(&mut c, p, ttl)).await {
                        Ok(Ok(chain)) => check(verify, &chain, p),
                        Ok(Err(code)) => Err(code),
                        Err(_) => Err("timeout".into()),
                    };
                    Done { phase: ph, fresh: false, lag, latency: t0.elapsed(), result }
                });
            }
            at = fresh_tick.tick() => {
                let ph = current(&phase);
                let (ep, tls, pool) = (ep.clone(), tls.clone(), pool.clone());
                let (i, timeout, ttl) = (k, cfg.timeout, cfg.ttl);
                k += 1;
                tasks.spawn(async move {
                    let lag = at.elapsed();
                    let t0 = Instant::now();
                    let p = &pool[i % pool.len()];
                    let attempt = async {
                        let ch = client::channel_with_tls(&ep, tls)
                            .await
                            .map_err(|_| "connect failed".to_owned())?;
                        let mut c = IstioCertificateServiceClient::new(ch);
                        call(&mut c, p, ttl).await
                    };
                    let result = match tokio::time::timeout(timeout, attempt).await {
                        Ok(Ok(chain)) => check(true, &chain, p),
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err("timeout".into()),
                    };
                    Done { phase: ph, fresh: true, lag, latency: t0.elapsed(), result }
                });
            }
            Some(done) = tasks.join_next() => record(&mut stats, done),
        }
    }
    while let Some(done) = tasks.join_next().await {
        record(&mut stats, done);
    }
    Ok(stats)
}

fn check(verify: bool, chain: &[String], p: &Prepared) -> Result<bool, String> {
    if !verify {
        return Ok(false);
    }
    client::verify_issued(chain, &p.identity, ::time::OffsetDateTime::now_utc())
        .map(|_| true)
        .map_err(|e| format!("answer failed verification: {e}"))
}

fn record(stats: &mut [PhaseStats], done: Result<Done, tokio::task::JoinError>) {
    let Ok(d) = done else {
        // A request task panicked: count it against the warm-up, loudly.
        *stats[0].failed.entry("task panicked".into()).or_default() += 1;
        return;
    };
    let s = &mut stats[d.phase as usize];
    s.max_lag = s.max_lag.max(d.lag);
    let us = d.latency.as_micros().max(1) as u64;
    match (d.result, d.fresh) {
        (Ok(verified), false) => {
            s.ok += 1;
            s.verified += u64::from(verified);
            let _ = s.hist.record(us);
        }
        (Ok(verified), true) => {
            s.new_ok += 1;
            s.verified += u64::from(verified);
            let _ = s.new_hist.record(us);
        }
        (Err(e), false) => *s.failed.entry(e).or_default() += 1,
        (Err(e), true) => *s.new_failed.entry(e).or_default() += 1,
    }
}
