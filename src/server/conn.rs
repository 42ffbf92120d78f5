//! One HTTP/2 connection's life, from the end of its handshake to its close,
//! and every stream on it.
//!
//! meshsign drives hyper's HTTP/2 server itself (with tonic's routes as the
//! service) so that each bound a stranger could push against is ours to set
//! and to test. Per connection:
//!
//! - **maximum age** (jittered ±10%, as gRPC does, so connections opened in
//!   one burst do not all reconnect in one burst): a graceful GOAWAY, then
//!   `max_connection_age_grace` for the calls in flight;
//! - **idle timeout**: no call in flight for `idle_timeout` → GOAWAY. PINGs
//!   (ours or the client's) are not calls, so a peer that only answers PINGs
//!   is idle;
//! - **stream budget**: streams opened, as a token bucket; a client over it
//!   gets `UNAVAILABLE` on that stream and a GOAWAY, and reconnects;
//! - **reset budget**: streams the client abandons (RST_STREAM, or a closed
//!   connection, before meshsign answered), as a token bucket; over it: GOAWAY
//!   and the connection closes after a short grace. This is the late-reset
//!   attack's bound (hyper already bounds the classic rapid reset);
//! - **shutdown**: a GOAWAY to every connection, then `drain_timeout` for the
//!   calls in flight before connections are closed.
//!
//! Server-wide: past `max_calls_in_flight` calls in progress, a connection
//! that already has its fair share (8) in progress gets `RESOURCE_EXHAUSTED`
//! for a new one, and past twice that every connection does: held streams
//! cannot add up across connections, and the connections holding them cannot
//! lock out a client with a call or two.
//!
//! Per stream: the body of a unary call must arrive within `body_timeout` of
//! its headers and be at most `max_request_bytes`; the whole call (answer
//! included) within `request_timeout` or the client's `grpc-timeout`,
//! whichever is sooner. Calls refused here, before the CA service reads them,
//! are counted in `meshsign_requests_refused_early_total{reason}` and logged
//! under the shared refusal-log budget.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, Sleep};
use tonic::service::Routes;
use tonic::{Code, Status};
use tower::Service;

use super::tls::{Conn, PeerInfo};
use crate::config::{Budget, Limits};
use crate::logging::LineBudget;
use crate::metrics::Metrics;

/// The unary methods whose request body is read (bounded in time and size)
/// before the service sees it. Streaming methods (reflection, health Watch)
/// get their body as it comes.
const UNARY_PATHS: [&str; 2] = [
    "/istio.v1.auth.IstioCertificateService/CreateCertificate",
    "/grpc.health.v1.Health/Check",
];
/// The CA method: its early refusals are told apart from the service's own.
const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// gRPC's length-prefixed message header.
const GRPC_FRAME_HEADER: usize = 5;
/// After a GOAWAY for abuse (budgets), how long calls in flight may finish.
const ABUSE_GRACE: Duration = Duration::from_secs(1);

/// Per-connection and per-stream bounds, from [`Limits`].
#[derive(Debug, Clone, PartialEq)]
pub struct ConnSettings {
    pub max_concurrent_streams: u32,
    pub max_header_list_bytes: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Zero: no maximum age.
    pub max_age: Duration,
    pub age_grace: Duration,
    /// Zero: connections may idle for ever.
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub body_timeout: Duration,
    pub max_request_bytes: usize,
    pub stream_budget: Budget,
    pub reset_budget: Budget,
    pub refusal_budget: Budget,
    pub drain_timeout: Duration,
    pub max_calls_in_flight: usize,
}

impl ConnSettings {
    pub fn from_limits(l: &Limits) -> Self {
        Self {
            max_concurrent_streams: l.max_concurrent_streams,
            max_header_list_bytes: l.max_header_list_bytes,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_age: l.max_connection_age,
            age_grace: l.max_connection_age_grace,
            idle_timeout: l.idle_timeout,
            request_timeout: l.request_timeout,
            body_timeout: l.body_timeout,
            max_request_bytes: l.max_request_bytes,
            stream_budget: l.stream_budget,
            reset_budget: l.reset_budget,
            refusal_budget: l.refusal_budget,
            drain_timeout: l.drain_timeout,
            max_calls_in_flight: l.max_calls_in_flight,
        }
    }
}

/// What the connection layer reports to.
#[derive(Debug, Clone)]
pub struct ConnObservers {
    pub metrics: Arc<Metrics>,
    /// Shared with the CA service: refusals have one log budget.
    pub refusal_log: Arc<LineBudget>,
}

/// Serves every connection `incoming` yields until `shutdown` resolves, then
/// drains: GOAWAY to all, in-flight calls get `drain_timeout`, and returns
/// once every connection is closed. Each new connection takes the
/// `settings` current when it is accepted (a reload may change them).
pub async fn serve<I>(
    incoming: I,
    routes: Routes,
    mut settings: watch::Receiver<ConnSettings>,
    observers: ConnObservers,
    shutdown: impl Future<Output = ()>,
) where
    I: futures_util::Stream<Item = io::Result<Conn>>,
{
    let calls_in_flight = Arc::new(AtomicUsize::new(0));
    let mut shared = Shared::new(
        settings.borrow_and_update().clone(),
        routes,
        observers,
        calls_in_flight,
    );
    let (drain_tx, drain_rx) = watch::channel(false);
    {
        // Dropping `incoming` at the end of this scope stops the accept loop
        // and closes the listening socket before the drain.
        let mut incoming = pin!(incoming);
        let mut shutdown = pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                next = incoming.next() => match next {
                    Some(Ok(conn)) => {
                        // A configuration reload changed the limits: they
                        // apply to connections from now on (a connection
                        // keeps those it started with, at most until its
                        // maximum age).
                        if settings.has_changed().unwrap_or(false) {
                            shared = Shared::new(
                                settings.borrow_and_update().clone(),
                                shared.routes.clone(),
                                shared.observers.clone(),
                                shared.calls_in_flight.clone(),
                            );
                        }
                        tokio::spawn(serve_connection(conn, shared.clone(), drain_rx.clone()));
                        // One new connection per scheduler round: a burst of
                        // them (a reconnect storm, an attacker's thousands)
                        // enters behind the calls already queued, never as a
                        // block of hundreds of tasks ahead of them.
                        tokio::task::yield_now().await;
                    }
                    Some(Err(e)) => tracing::debug!(error = %e, "connection not accepted"),
                    None => break,
                },
            }
        }
    }
    let _ = drain_tx.send(true);
    drop(drain_rx);
    // Every connection task holds a receiver until it ends.
    drain_tx.closed().await;
}

struct Shared {
    http: hyper::server::conn::http2::Builder<TokioExecutor>,
    routes: Routes,
    settings: ConnSettings,
    observers: ConnObservers,
    /// Calls in progress on every connection (`max_calls_in_flight`),
    /// across changes of settings.
    calls_in_flight: Arc<AtomicUsize>,
}

impl Shared {
    fn new(
        settings: ConnSettings,
        routes: Routes,
        observers: ConnObservers,
        calls_in_flight: Arc<AtomicUsize>,
    ) -> Arc<Self> {
        let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        let (stream_window, connection_window) = flow_control_windows(&settings);
        http.timer(TokioTimer::new())
            .initial_stream_window_size(stream_window)
            .initial_connection_window_size(connection_window)
            .max_concurrent_streams(settings.max_concurrent_streams)
            .max_header_list_size(settings.max_header_list_bytes)
            .keep_alive_interval(settings.keepalive_interval)
            .keep_alive_timeout(settings.keepalive_timeout)
            .auto_date_header(false);
        Arc::new(Self {
            http,
            routes,
            settings,
            observers,
            calls_in_flight,
        })
    }
}

/// HTTP/2 flow-control windows sized for the largest message a call may
/// carry: a client can send at most one such message (and its 5-byte gRPC
/// prefix) on a stream before meshsign has read it, so a call refused for its
/// size (or its credentials) costs meshsign the decryption of at most that,
/// not of hyper's default megabyte, before the refusal reaches the client.
/// The connection window lets every permitted stream have a full one (and is
/// never below HTTP/2's 65,535 bytes, which only WINDOW_UPDATE could change).
fn flow_control_windows(settings: &ConnSettings) -> (u32, u32) {
    const HTTP2_DEFAULT_WINDOW: u32 = 65_535;
    const MAX_WINDOW: u32 = (1 << 31) - 1;
    let largest_call = settings.max_request_bytes.saturating_add(GRPC_FRAME_HEADER);
    let stream = u32::try_from(largest_call)
        .unwrap_or(MAX_WINDOW)
        .min(MAX_WINDOW);
    let connection = stream
        .saturating_mul(settings.max_concurrent_streams.max(1))
        .clamp(HTTP2_DEFAULT_WINDOW, MAX_WINDOW);
    (stream, connection)
}

/// Why meshsign ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum CloseReason {
    MaxAge = 1,
    Idle,
    StreamBudget,
    ResetBudget,
    Shutdown,
    RefusalBudget,
}

impl CloseReason {
    fn label(self) -> &'static str {
        match self {
            CloseReason::MaxAge => "max_age",
            CloseReason::Idle => "idle",
            CloseReason::StreamBudget => "stream_budget",
            CloseReason::ResetBudget => "reset_budget",
            CloseReason::Shutdown => "shutdown",
            CloseReason::RefusalBudget => "refusal_budget",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => CloseReason::MaxAge,
            2 => CloseReason::Idle,
            3 => CloseReason::StreamBudget,
            4 => CloseReason::ResetBudget,
            5 => CloseReason::Shutdown,
            6 => CloseReason::RefusalBudget,
            _ => return None,
        })
    }
}

/// A token bucket for one connection (only its own streams touch it).
#[derive(Debug)]
struct ConnBudget {
    budget: Budget,
    state: Mutex<(f64, Instant)>,
}

impl ConnBudget {
    fn new(budget: Budget, now: Instant) -> Self {
        Self {
            budget,
            state: Mutex::new((f64::from(budget.burst), now)),
        }
    }

    fn take(&self, now: Instant) -> bool {
        if !self.budget.is_enabled() {
            return true;
        }
        let Ok(mut s) = self.state.lock() else {
            return true;
        };
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.budget.per_second).min(f64::from(self.budget.burst));
        s.1 = now;
        if s.0 < 1.0 {
            return false;
        }
        s.0 -= 1.0;
        true
    }
}

/// What the streams of one connection share with its task.
#[derive(Debug)]
struct ConnState {
    peer: Arc<PeerInfo>,
    opened_at: Instant,
    in_flight: AtomicU32,
    /// Milliseconds after `opened_at` when the last call ended.
    last_call_end_ms: AtomicU64,
    streams: ConnBudget,
    resets: ConnBudget,
    /// Calls refused for the client's fault.
    refusals: ConnBudget,

    /// A budget ran out: the reason, and a wake-up for the connection task.
    abuse: AtomicU8,
    abuse_signal: Notify,
}

impl ConnState {
    fn flag(&self, reason: CloseReason) {
        if self
            .abuse
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.abuse_signal.notify_one();
        }
    }

    /// When the connection becomes idle, if no call starts before then.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Instant::now() + idle;
        }
        let ended = Duration::from_millis(self.last_call_end_ms.load(Ordering::Acquire));
        self.opened_at + ended + idle
    }
}

async fn serve_connection(conn: Conn, shared: Arc<Shared>, mut drain: watch::Receiver<bool>) {
    let settings = &shared.settings;
    let metrics = &shared.observers.metrics;
    let now = Instant::now();
    let state = Arc::new(ConnState {
        peer: Arc::new(conn.peer().clone()),
        opened_at: now,
        in_flight: AtomicU32::new(0),
        last_call_end_ms: AtomicU64::new(0),
        streams: ConnBudget::new(settings.stream_budget, now),
        resets: ConnBudget::new(settings.reset_budget, now),
        refusals: ConnBudget::new(settings.refusal_budget, now),

        abuse: AtomicU8::new(0),
        abuse_signal: Notify::new(),
    });
    let service = StreamService {
        shared: shared.clone(),
        state: state.clone(),
    };
    let mut connection = pin!(shared.http.serve_connection(TokioIo::new(conn), service));
    let max_age = (!settings.max_age.is_zero()).then(|| now + jittered(settings.max_age));
    let far = now + Duration::from_secs(100 * 365 * 24 * 3600);
    // Set once a GOAWAY is sent: when the connection is closed regardless.
    let mut close_by: Option<Instant> = None;
    loop {
        let idle_at = if settings.idle_timeout.is_zero() {
            far
        } else {
            state.idle_deadline(settings.idle_timeout)
        };
        let serving = close_by.is_none();
        let goaway: Option<(CloseReason, Duration)> = tokio::select! {
            done = connection.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(remote = state.peer.remote.map(tracing::field::display), error = %e, "connection ended with an error");
                }
                break;
            }
            _ = tokio::time::sleep_until(max_age.unwrap_or(far)), if serving && max_age.is_some() => {
                Some((CloseReason::MaxAge, settings.age_grace))
            }
            _ = tokio::time::sleep_until(idle_at), if serving && !settings.idle_timeout.is_zero() => {
                (Instant::now() >= state.idle_deadline(settings.idle_timeout))
                    .then_some((CloseReason::Idle, ABUSE_GRACE))
            }
            _ = state.abuse_signal.notified(), if serving => {
                CloseReason::from_u8(state.abuse.load(Ordering::Acquire)).map(|r| (r, ABUSE_GRACE))
            }
            _ = drain.changed(), if serving => Some((CloseReason::Shutdown, settings.drain_timeout)),
            _ = tokio::time::sleep_until(close_by.unwrap_or(far)), if !serving => {
                metrics.connections_closed.with_label_values(&["forced"]).inc();
                tracing::debug!(remote = state.peer.remote.map(tracing::field::display), "closing a connection whose grace ran out");
                break;
            }
        };
        if let Some((reason, grace)) = goaway {
            metrics
                .connections_closed
                .with_label_values(&[reason.label()])
                .inc();
            if matches!(
                reason,
                CloseReason::StreamBudget | CloseReason::ResetBudget | CloseReason::RefusalBudget
            ) {
                tracing::info!(
                    remote = state.peer.remote.map(tracing::field::display),
                    reason = reason.label(),
                    "sending GOAWAY: connection over its budget"
                );
            }
            connection.as_mut().graceful_shutdown();
            close_by = Some(Instant::now() + grace);
        }
    }
    drop(drain);
}

/// Calls one connection may have in progress and still start another once
/// the server is past `max_calls_in_flight`.
const FAIR_SHARE: u32 = 8;

/// Past `max` calls in flight server-wide, only connections with fewer than
/// [`FAIR_SHARE`] calls of their own may start another (a few connections
/// holding many streams cannot lock everyone else out); past twice `max`,
/// none may.
fn over_calls_in_flight(server_wide: usize, conn: &ConnState, max: usize) -> bool {
    if server_wide < max {
        return false;
    }
    // This call is already counted in the connection's in_flight.
    server_wide >= max.saturating_mul(2) || conn.in_flight.load(Ordering::Acquire) > FAIR_SHARE
}

/// `d` ± 10%, so a burst of connections does not come back as one burst.
fn jittered(d: Duration) -> Duration {
    use aws_lc_rs::rand::SecureRandom;
    let mut b = [0u8; 2];
    if aws_lc_rs::rand::SystemRandom::new().fill(&mut b).is_err() {
        return d;
    }
    let unit = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX); // 0..=1
    d.mul_f64(0.9 + 0.2 * unit)
}

/// Counts a stream in flight; on drop, a stream that did not finish its
/// answer was abandoned by the client and spends the reset budget. Owns the
/// stream's handles on its connection and the server.
struct StreamGuard {
    state: Arc<ConnState>,
    shared: Arc<Shared>,
    finished: AtomicBool,
    reset_budget: bool,
}

impl StreamGuard {
    /// Also returns how many calls were in flight server-wide before this one.
    fn new(state: Arc<ConnState>, shared: Arc<Shared>) -> (Self, usize) {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        let before = shared.calls_in_flight.fetch_add(1, Ordering::AcqRel);
        let reset_budget = shared.settings.reset_budget.is_enabled();
        (
            Self {
                state,
                shared,
                finished: AtomicBool::new(false),
                reset_budget,
            },
            before,
        )
    }

    fn finish(&self) {
        self.finished.store(true, Ordering::Release);
    }

    /// The call was answered with `code` (`undecodable`: its message did not
    /// decode): a refusal for the client's own fault spends the connection's
    /// refusal budget. A connection that keeps sending what is refused (a
    /// flood without, or with forged, credentials, or of messages that do not
    /// decode) is sent away, so each further burst costs it a new TLS
    /// handshake.
    fn refused(&self, code: Code, undecodable: bool) {
        let clients_fault = undecodable
            || matches!(
                code,
                Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::InvalidArgument
                    | Code::ResourceExhausted
                    | Code::Unimplemented
            );
        if clients_fault && !self.state.refusals.take(Instant::now()) {
            self.state.flag(CloseReason::RefusalBudget);
        }
    }

    /// The client gave up on this stream (seen by the handler itself):
    /// charged to the reset budget now, once.
    fn abandoned(&self) {
        if !self.finished.swap(true, Ordering::AcqRel)
            && self.reset_budget
            && !self.state.resets.take(Instant::now())
        {
            self.state.flag(CloseReason::ResetBudget);
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let s = &self.state;
        let ms = s.opened_at.elapsed().as_millis() as u64;
        s.last_call_end_ms.fetch_max(ms, Ordering::AcqRel);
        s.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.shared.calls_in_flight.fetch_sub(1, Ordering::AcqRel);
        if self.reset_budget
            && !self.finished.load(Ordering::Acquire)
            && !s.resets.take(Instant::now())
        {
            s.flag(CloseReason::ResetBudget);
        }
    }
}

/// Set by the CA service when a request reached it (so a refusal without it
/// was made while decoding), and when it shed the request for its own
/// overload (a refusal that is not the client's fault).
#[derive(Debug, Clone, Default)]
pub struct ReachedService(Arc<(AtomicBool, AtomicBool)>);

impl ReachedService {
    pub fn mark(&self) {
        self.0 .0.store(true, Ordering::Release);
    }

    pub fn mark_overloaded(&self) {
        self.0 .1.store(true, Ordering::Release);
    }

    fn reached(&self) -> bool {
        self.0 .0.load(Ordering::Acquire)
    }

    fn overloaded(&self) -> bool {
        self.0 .1.load(Ordering::Acquire)
    }
}

/// The per-stream service: bounds, then tonic's routes.
#[derive(Clone)]
struct StreamService {
    shared: Arc<Shared>,
    state: Arc<ConnState>,
}

impl hyper::service::Service<Request<Incoming>> for StreamService {
    type Response = Response<StreamBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let (shared, state) = (self.shared.clone(), self.state.clone());
        Box::pin(async move { Ok(handle(shared, state, request).await) })
    }
}

async fn handle(
    shared: Arc<Shared>,
    state: Arc<ConnState>,
    request: Request<Incoming>,
) -> Response<StreamBody> {
    let started = Instant::now();
    let (guard, in_flight) = StreamGuard::new(state, shared);
    let (settings, state) = (&guard.shared.settings, &guard.state);
    if !state.streams.take(started) {
        // Over budget: the connection is sent away (a graceful GOAWAY, so
        // streams racing it are still taken), but this call is served: a
        // legitimate client that is merely busy never sees an error.
        state.flag(CloseReason::StreamBudget);
    }
    if over_calls_in_flight(in_flight, state, settings.max_calls_in_flight) {
        return refuse(
            guard,
            "calls_in_flight",
            Status::resource_exhausted("too many calls in progress, retry later"),
        );
    }
    let deadline = started
        + grpc_timeout(request.headers()).map_or(settings.request_timeout, |t| {
            t.min(settings.request_timeout)
        });
    let (mut parts, body) = request.into_parts();
    let unary = UNARY_PATHS.contains(&parts.uri.path());
    let reached = (parts.uri.path() == CREATE_CERTIFICATE).then(ReachedService::default);
    parts.extensions.insert(state.peer.clone());
    if let Some(r) = &reached {
        parts.extensions.insert(r.clone());
    }
    let body = if unary {
        let body_by = (started + settings.body_timeout).min(deadline);
        let read =
            tokio::time::timeout_at(body_by, read_unary_body(body, settings.max_request_bytes))
                .await;
        match read {
            Ok(Ok(bytes)) => tonic::body::Body::new(Full::new(bytes)),
            Ok(Err(BodyError::TooLarge { declared })) => {
                let max = settings.max_request_bytes;
                return refuse(
                    guard,
                    "too_large",
                    Status::resource_exhausted(match declared {
                        // grpc-go's words, as istiod answers.
                        Some(n) => {
                            format!("grpc: received message larger than max ({n} vs. {max})")
                        }
                        None => format!("grpc: received message larger than max ({max} bytes)"),
                    }),
                );
            }
            Ok(Err(BodyError::Broken)) => {
                // The client reset the stream (or the connection broke)
                // before its body was in: an abandoned stream.
                guard.abandoned();
                return status_response(Status::cancelled("request body broken"), guard);
            }
            Err(_) => {
                return refuse(
                    guard,
                    "body_timeout",
                    Status::deadline_exceeded(format!(
                        "request body not received within {:?} of its headers",
                        body_by - started
                    )),
                );
            }
        }
    } else {
        tonic::body::Body::new(body)
    };
    let request = Request::from_parts(parts, body);
    let mut routes = guard.shared.routes.clone();
    let response = match tokio::time::timeout_at(deadline, routes.call(request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(never)) => match never {},
        Err(_) => {
            return refuse(
                guard,
                "deadline",
                Status::deadline_exceeded("request timed out"),
            );
        }
    };
    if let Some(code) = grpc_status(&response) {
        // Refused before the CA service saw it: its message did not decode
        // (INTERNAL, as grpc-go answers), which is the client's making.
        let undecodable = reached.as_ref().is_some_and(|r| !r.reached());
        if !reached.as_ref().is_some_and(ReachedService::overloaded) {
            guard.refused(code, undecodable);
        }
        let early = match &reached {
            Some(_) if undecodable => Some("decode"),
            _ if code == Code::Unimplemented => Some("unimplemented"),
            _ => None,
        };
        if let Some(reason) = early {
            count_early(&guard, reason, code);
        }
    }
    let deadline = (!unary).then(|| Box::pin(tokio::time::sleep_until(deadline)));
    stream_response(response, guard, deadline)
}

/// Why a unary call's body was not read.
enum BodyError {
    /// Over `max_request_bytes`: the length its gRPC message prefix
    /// declares, when that was what told.
    TooLarge { declared: Option<u64> },
    /// The client reset the stream or the connection broke.
    Broken,
}

/// Reads a unary call's body: at most `max_message` bytes of gRPC message
/// plus its 5-byte prefix. A prefix declaring more is refused as soon as it
/// arrives, without reading (and decrypting) the rest of the body.
async fn read_unary_body(mut body: Incoming, max_message: usize) -> Result<Bytes, BodyError> {
    let limit = max_message + GRPC_FRAME_HEADER;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    let mut prefix_checked = false;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| BodyError::Broken)?.into_data() else {
            continue; // trailers
        };
        len += data.len();
        chunks.push(data);
        if len > limit {
            return Err(BodyError::TooLarge { declared: None });
        }
        if !prefix_checked && len >= GRPC_FRAME_HEADER {
            prefix_checked = true;
            let mut prefix = [0u8; GRPC_FRAME_HEADER];
            let mut at = 0;
            for c in &chunks {
                let n = (GRPC_FRAME_HEADER - at).min(c.len());
                prefix[at..at + n].copy_from_slice(&c[..n]);
                at += n;
                if at == GRPC_FRAME_HEADER {
                    break;
                }
            }
            let declared = u64::from(u32::from_be_bytes([
                prefix[1], prefix[2], prefix[3], prefix[4],
            ]));
            if declared > max_message as u64 {
                return Err(BodyError::TooLarge {
                    declared: Some(declared),
                });
            }
        }
    }
    Ok(match chunks.len() {
        1 => chunks.swap_remove(0),
        _ => {
            let mut all = bytes::BytesMut::with_capacity(len);
            for c in chunks {
                all.extend_from_slice(&c);
            }
            all.freeze()
        }
    })
}

/// A trailers-only error response's code (tonic puts a refusal's
/// `grpc-status` in the headers).
fn grpc_status<B>(response: &Response<B>) -> Option<Code> {
    let v = response.headers().get("grpc-status")?;
    let code = Code::from_bytes(v.as_bytes());
    (code != Code::Ok).then_some(code)
}

fn count_early(guard: &StreamGuard, reason: &str, code: Code) {
    let o = &guard.shared.observers;
    o.metrics.refused_early.with_label_values(&[reason]).inc();
    match o
        .refusal_log
        .admit(crate::clock::Clock::now_unix(&crate::clock::SystemClock))
    {
        Some(suppressed) => tracing::warn!(
            code = ?code,
            remote = guard.state.peer.remote.map(tracing::field::display),
            reason,
            suppressed_before = suppressed,
            "call refused before the service read it"
        ),
        None => o.metrics.log_suppressed.inc(),
    }
}

/// Answers a call with `status` before the service read it, counted as an
/// early refusal for `reason`.
fn refuse(guard: StreamGuard, reason: &str, status: Status) -> Response<StreamBody> {
    count_early(&guard, reason, status.code());
    if reason != "calls_in_flight" {
        guard.refused(status.code(), false);
    }
    // Answered: not an abandoned stream.
    guard.finish();
    status_response(status, guard)
}

/// A trailers-only response carrying `status`.
fn status_response(status: Status, guard: StreamGuard) -> Response<StreamBody> {
    stream_response(status.into_http(), guard, None)
}

/// `response` with its body wrapped in a [`StreamBody`] that owns `guard`.
fn stream_response(
    response: Response<tonic::body::Body>,
    guard: StreamGuard,
    deadline: Option<Pin<Box<Sleep>>>,
) -> Response<StreamBody> {
    let (parts, inner) = response.into_parts();
    Response::from_parts(
        parts,
        StreamBody {
            inner,
            guard,
            deadline,
        },
    )
}

/// The client's `grpc-timeout` header (`<digits><unit>`), if valid.
fn grpc_timeout(headers: &hyper::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n.saturating_mul(3600)),
        b"M" => Duration::from_secs(n.saturating_mul(60)),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A response body that marks its stream finished once the answer is
/// complete and, for streaming calls, ends the stream at the call's deadline.
pub struct StreamBody {
    inner: tonic::body::Body,
    guard: StreamGuard,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(deadline) = &mut this.deadline {
            if deadline.as_mut().poll(cx).is_ready() {
                this.guard.finish();
                return Poll::Ready(Some(Err(Status::deadline_exceeded(
                    "stream outlived limits.request_timeout",
                ))));
            }
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.guard.finish(),
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => this.guard.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.guard.finish();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_parses_as_grpc_defines_it() {
        let mut h = hyper::HeaderMap::new();
        for (v, want) in [
            ("10S", Some(Duration::from_secs(10))),
            ("500m", Some(Duration::from_millis(500))),
            ("2M", Some(Duration::from_secs(120))),
            ("1H", Some(Duration::from_secs(3600))),
            ("7u", Some(Duration::from_micros(7))),
            ("9n", Some(Duration::from_nanos(9))),
            ("123456789S", None),
            ("S", None),
            ("10x", None),
            ("", None),
            ("-1S", None),
        ] {
            h.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&h), want, "{v:?}");
        }
    }

    #[test]
    fn a_connection_budget_refills() {
        let t = Instant::now();
        let b = ConnBudget::new(
            Budget {
                per_second: 10.0,
                burst: 2,
            },
            t,
        );
        assert!(b.take(t) && b.take(t));
        assert!(!b.take(t));
        assert!(b.take(t + Duration::from_millis(100)));
        let off = ConnBudget::new(
            Budget {
                per_second: 0.0,
                burst: 0,
            },
            t,
        );
        assert!((0..1000).all(|_| off.take(t)));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..100 {
            let j = jittered(Duration::from_secs(100));
            assert!(
                j >= Duration::from_secs(90) && j <= Duration::from_secs(110),
                "{j:?}"
            );
        }
    }

    fn settings(max_request_bytes: usize, streams: u32) -> ConnSettings {
        let mut limits = crate::config::Config::dev_default().limits;
        limits.max_request_bytes = max_request_bytes;
        limits.max_concurrent_streams = streams;
        ConnSettings::from_limits(&limits)
    }

    #[test]
    fn windows_fit_the_largest_call_and_no_more() {
        // The defaults: a 32 KiB call and its prefix, not HTTP/2's default
        // 65,535 bytes (hyper's own is 1 MiB).
        assert_eq!(
            flow_control_windows(&settings(32 * 1024, 16)),
            (32 * 1024 + 5, (32 * 1024 + 5) * 16)
        );
        // A larger limit: one whole call (and its 5-byte prefix) fits.
        assert_eq!(
            flow_control_windows(&settings(1 << 20, 4)),
            ((1 << 20) + 5, ((1 << 20) + 5) * 4)
        );
        // The connection window never goes below HTTP/2's initial one.
        assert_eq!(flow_control_windows(&settings(4096, 1)), (4096 + 5, 65_535));
        // Never past HTTP/2's largest window.
        let (s, c) = flow_control_windows(&settings(usize::MAX, u32::MAX));
        assert_eq!((s, c), ((1 << 31) - 1, (1 << 31) - 1));
    }
}
