//! Limits, each hit on purpose and answered with its documented code:
//!
//! - past `limits.max_connections` open connections, or
//!   `limits.max_concurrent_handshakes` handshakes in progress, a new
//!   connection is accepted and closed at once (never left hanging), counted,
//!   and the server keeps serving the connections it holds;
//! - an idle connection is sent away even while it answers PINGs;
//! - a request body that does not follow its headers in time is refused
//!   (`DEADLINE_EXCEEDED`);
//! - a connection that abandons too many streams after the server accepted
//!   them (the late-reset attack), or opens streams faster than its budget,
//!   gets a GOAWAY;
//! - per-caller and failed-authentication rate limits answer
//!   `RESOURCE_EXHAUSTED`, per pod and per address, and so does a server
//!   with `max_calls_in_flight` calls in progress;
//! - shutdown answers the calls in flight and is bounded by `drain_timeout`
//!   (what `SIGTERM` runs).

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, tls_connect, TestServer, Workload};
use meshsign::client::WorkloadKeyType;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::Code;

/// True when the server closes `tcp` within `within` without a byte.
async fn closed_at_once(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, tcp.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_and_held_ones_keep_working() {
    let ts = TestServer::dev("limits: { max_connections: 3 }\n").await;
    let wl = Workload::new("default", "sleep", WorkloadKeyType::EcdsaP256);
    let token = ts.token("default", "sleep");
    let ep = ts.endpoint();
    let mut held = Vec::new();
    for _ in 0..3 {
        let channel = meshsign::client::channel(&ep).await.unwrap();
        wl.send_on(&channel, Some(&token)).await.unwrap();
        held.push(channel);
    }
    let mut extra = TcpStream::connect(ts.server.local_addr).await.unwrap();
    assert!(
        closed_at_once(&mut extra, Duration::from_secs(1)).await,
        "a 4th connection was kept"
    );
    assert!(
        wl.obtain(&ep, Some(&token), 600).await.is_err(),
        "a 4th connection was served"
    );
    assert!(
        ts.metric("meshsign_connections_refused_total{reason=\"max_connections\"}")
            .await
            >= 2.0
    );
    // The held connections still work; releasing one makes room.
    let first = held.remove(0);
    wl.send_on(&first, Some(&token))
        .await
        .expect("a held connection keeps working");
    drop(first);
    eventually(
        "no room after a connection closed",
        Duration::from_secs(5),
        || async { wl.obtain(&ep, Some(&token), 600).await.is_ok() },
    )
    .await;
}

#[tokio::test]
async fn stalled_handshakes_make_room_for_new_ones() {
    let ts =
        TestServer::dev("limits: { max_concurrent_handshakes: 2, handshake_timeout: 10s }\n").await;
    let wl = Workload::new("default", "sleep", WorkloadKeyType::EcdsaP256);
    let token = ts.token("default", "sleep");
    // Two connections that never send a ClientHello hold both slots...
    let mut stalled: Vec<TcpStream> = vec![
        TcpStream::connect(ts.server.local_addr).await.unwrap(),
        TcpStream::connect(ts.server.local_addr).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...but a real client still gets through at once (well before the 10 s
    // handshake timeout): the longest-waiting handshakes are closed for it.
    let started = std::time::Instant::now();
    wl.obtain(&ts.endpoint(), Some(&token), 600)
        .await
        .expect("a real client gets through stalled handshakes");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        closed_at_once(&mut stalled[0], Duration::from_secs(1)).await,
        "the oldest stalled handshake was kept"
    );
    assert!(
        ts.metric("meshsign_connections_refused_total{reason=\"max_handshakes\"}")
            .await
            >= 1.0
    );
}

/// A raw HTTP/2 connection (h2 over TLS) to the test server, for what a
/// well-behaved gRPC client never does.
struct RawConn {
    send: h2::client::SendRequest<Bytes>,
    ping: Option<h2::PingPong>,
    /// Resolves when the connection is closed.
    driver: tokio::task::JoinHandle<Result<(), h2::Error>>,
}

impl RawConn {
    async fn open(ts: &TestServer) -> RawConn {
        let config = meshsign::client::client_tls_config(&ts.endpoint()).unwrap();
        let tls = tls_connect(ts.server.local_addr, Arc::new(config))
            .await
            .unwrap();
        let (send, mut conn) = h2::client::handshake(tls).await.unwrap();
        let ping = conn.ping_pong();
        let driver = tokio::spawn(conn);
        RawConn { send, ping, driver }
    }

    /// Opens a CreateCertificate stream: headers sent, body not.
    async fn open_stream(
        &mut self,
        token: &str,
    ) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), h2::Error> {
        let request = http::Request::builder()
            .method("POST")
            .uri("https://localhost/istio.v1.auth.IstioCertificateService/CreateCertificate")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", format!("Bearer {token}"))
            .body(())
            .unwrap();
        let mut send = self.send.clone().ready().await?;
        send.send_request(request, false)
    }

    /// Whether the server closed the connection within `within`.
    async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, &mut self.driver).await.is_ok()
    }
}

fn grpc_status(response: &http::Response<h2::RecvStream>) -> Option<Code> {
    response
        .headers()
        .get("grpc-status")
        .map(|v| Code::from_bytes(v.as_bytes()))
}

#[tokio::test]
async fn idle_connections_are_sent_away_even_when_they_answer_pings() {
    let ts = TestServer::dev("limits: { idle_timeout: 1s }\n").await;
    let mut conn = RawConn::open(&ts).await;
    let mut ping = conn.ping.take().expect("ping_pong");
    // The client keeps pinging (and answers the server's PINGs): that is not
    // a call, so the connection is idle and must be closed.
    let pinger = tokio::spawn(async move {
        loop {
            if ping.ping(h2::Ping::opaque()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert!(
        conn.closed_within(Duration::from_secs(5)).await,
        "an idle connection answering PINGs was kept open"
    );
    pinger.abort();
    assert_eq!(
        ts.metric("meshsign_connections_closed_total{reason=\"idle\"}")
            .await,
        1.0
    );
    // A connection with a call in flight is not idle: a held call outlives
    // the idle timeout until its own deadline answers it.
    let ts = TestServer::dev("limits: { idle_timeout: 1s, body_timeout: 2500ms }\n").await;
    let token = ts.token("default", "sleep");
    let mut conn = RawConn::open(&ts).await;
    let (response, _body) = conn.open_stream(&token).await.unwrap();
    let response = response.await.expect("an answer, not a closed connection");
    assert_eq!(grpc_status(&response), Some(Code::DeadlineExceeded));
}

#[tokio::test]
async fn a_request_body_must_follow_its_headers_in_time() {
    let ts = TestServer::dev("limits: { body_timeout: 300ms }\n").await;
    let token = ts.token("default", "sleep");
    let mut conn = RawConn::open(&ts).await;
    let started = std::time::Instant::now();
    let (response, _body) = conn.open_stream(&token).await.unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("a bodiless stream was held past its body deadline")
        .unwrap();
    assert_eq!(grpc_status(&response), Some(Code::DeadlineExceeded));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        ts.metric("meshsign_requests_refused_early_total{reason=\"body_timeout\"}")
            .await,
        1.0
    );
    // The connection itself is fine.
    let wl = Workload::new("default", "sleep", WorkloadKeyType::EcdsaP256);
    wl.obtain(&ts.endpoint(), Some(&token), 600).await.unwrap();
}

#[tokio::test]
async fn streams_reset_after_acceptance_spend_a_budget_then_the_connection_goes() {
    let ts = TestServer::dev("limits: { reset_budget: { per_second: 1, burst: 5 } }\n").await;
    let token = ts.token("default", "sleep");
    let wl = Workload::new("default", "sleep", WorkloadKeyType::EcdsaP256);
    let legit = meshsign::client::channel(&ts.endpoint()).await.unwrap();
    let mut conn = RawConn::open(&ts).await;
    let mut opened = 0;
    for _ in 0..50 {
        let Ok((_response, mut body)) = conn.open_stream(&token).await else {
            break; // GOAWAY received: no new streams
        };
        opened += 1;
        // The server has accepted the stream and waits for its body.
        tokio::time::sleep(Duration::from_millis(50)).await;
        body.send_reset(h2::Reason::CANCEL);
        if conn.driver.is_finished() {
            break;
        }
    }
    assert!(
        conn.closed_within(Duration::from_secs(3)).await,
        "a connection resetting {opened} accepted streams was kept"
    );
    assert!(opened <= 10, "{opened} late resets before the GOAWAY");
    assert_eq!(
        ts.metric("meshsign_connections_closed_total{reason=\"reset_budget\"}")
            .await,
        1.0
    );
    // Everyone else is served throughout.
    wl.send_on(&legit, Some(&token)).await.unwrap();
}

#[tokio::test]
async fn a_connection_over_its_stream_budget_is_sent_away_without_failing_a_call() {
    let ts = TestServer::dev(
        "limits: { stream_budget: { per_second: 0.01, burst: 3 } }\nrate_limits: { per_caller: { per_second: 0 } }\n",
    )
    .await;
    let token = ts.token("default", "sleep");
    let wl = Workload::new("default", "sleep", WorkloadKeyType::EcdsaP256);
    let channel = meshsign::client::channel(&ts.endpoint()).await.unwrap();
    // The call over the budget is still served; its connection is sent away.
    for _ in 0..4 {
        wl.send_on(&channel, Some(&token)).await.unwrap();
    }
    eventually(
        "GOAWAY for the stream budget",
        Duration::from_secs(5),
        || async {
            ts.metric("meshsign_connections_closed_total{reason=\"stream_budget\"}")
                .await
                == 1.0
        },
    )
    .await;
    // The client reconnects (a new connection, a new budget) and is served
    // without an error.
    for _ in 0..3 {
        wl.send_on(&channel, Some(&token)).await.unwrap();
    }
}

#[tokio::test]
async fn each_caller_pod_has_a_request_budget() {
    let ts = TestServer::dev("rate_limits: { per_caller: { per_second: 0.01, burst: 2 } }\n").await;
    let ep = ts.endpoint();
    let sleep = Workload::new("default", "sleep", WorkloadKeyType::EcdsaP256);
    let token = ts.token("default", "sleep");
    sleep.obtain(&ep, Some(&token), 600).await.unwrap();
    sleep.obtain(&ep, Some(&token), 600).await.unwrap();
    let refused = sleep.obtain(&ep, Some(&token), 600).await.unwrap_err();
    assert_eq!(refused.0, Code::ResourceExhausted, "{}", refused.1);
    assert_eq!(
        ts.metric("meshsign_requests_shed_total{reason=\"per_caller\"}")
            .await,
        1.0
    );
    // Another identity has its own budget.
    let other = Workload::new("default", "other", WorkloadKeyType::EcdsaP256);
    other
        .obtain(&ep, Some(&ts.token("default", "other")), 600)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_address_that_keeps_failing_authentication_waits_but_mtls_callers_do_not() {
    let ts = TestServer::dev(
        "authn: { client_certificates: true }\nrate_limits: { failed_auth_per_address: { per_second: 0.01, burst: 3 } }\n",
    )
    .await;
    let ep = ts.endpoint();
    let wl = Workload::new("default", "sleep", WorkloadKeyType::EcdsaP256);
    let token = ts.token("default", "sleep");
    // A workload gets its certificate before the flood.
    let (_, issued) = wl.obtain(&ep, Some(&token), 600).await.unwrap();
    for _ in 0..3 {
        let e = wl.obtain(&ep, Some("not.a.token"), 600).await.unwrap_err();
        assert_eq!(e.0, Code::Unauthenticated);
    }
    // Spent: even a good token from this address waits now...
    let e = wl.obtain(&ep, Some(&token), 600).await.unwrap_err();
    assert_eq!(e.0, Code::ResourceExhausted, "{}", e.1);
    assert_eq!(
        ts.metric("meshsign_requests_shed_total{reason=\"failed_auth_per_address\"}")
            .await,
        1.0
    );
    // ...but a caller that proved itself with a client certificate does not.
    let mut mtls = ep.clone();
    mtls.client_identity = Some(wl.client_identity(&issued));
    wl.obtain(&mtls, None, 600)
        .await
        .expect("an mTLS renewal from a throttled address");
}

/// Opens `n` bodiless CreateCertificate streams on `conn`; returns the held
/// ones and how many were refused at once with `RESOURCE_EXHAUSTED`.
async fn hold_streams(
    conn: &mut RawConn,
    token: &str,
    n: usize,
) -> (Vec<h2::SendStream<Bytes>>, usize) {
    let (mut held, mut refused) = (Vec::new(), 0);
    for _ in 0..n {
        let (response, body) = conn.open_stream(token).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(300), response).await {
            Ok(Ok(r)) => {
                assert_eq!(grpc_status(&r), Some(Code::ResourceExhausted));
                refused += 1;
            }
            Ok(Err(e)) => panic!("stream failed: {e}"),
            Err(_) => held.push(body), // no answer: the server holds it, waiting for its body
        }
    }
    (held, refused)
}

#[tokio::test]
async fn calls_in_flight_are_bounded_without_locking_out_light_connections() {
    let ts = TestServer::dev("limits: { max_calls_in_flight: 10, body_timeout: 20s }\n").await;
    let token = ts.token("default", "sleep");
    let wl = Workload::new("default", "sleep", WorkloadKeyType::EcdsaP256);
    let ep = ts.endpoint();
    // One connection holds 10 calls: the server is at its soft limit, and
    // that heavy connection gets no more.
    let mut heavy = RawConn::open(&ts).await;
    let (mut held, refused) = hold_streams(&mut heavy, &token, 12).await;
    assert_eq!((held.len(), refused), (10, 2));
    // A client with a single call still gets through.
    wl.obtain(&ep, Some(&token), 600)
        .await
        .expect("a light connection is served past the soft limit");
    // Light connections fill the rest, up to twice the limit...
    for _ in 0..2 {
        let mut light = RawConn::open(&ts).await;
        let (more, refused) = hold_streams(&mut light, &token, 5).await;
        assert_eq!((more.len(), refused), (5, 0));
        held.extend(more);
    }
    // ...where everyone waits.
    let e = wl.obtain(&ep, Some(&token), 600).await.unwrap_err();
    assert_eq!(e.0, Code::ResourceExhausted, "{}", e.1);
    assert_eq!(
        ts.metric("meshsign_requests_refused_early_total{reason=\"calls_in_flight\"}")
            .await,
        3.0
    );
    // Released, the room is there again.
    for mut h in held {
        h.send_reset(h2::Reason::CANCEL);
    }
    eventually(
        "no room after the held calls ended",
        Duration::from_secs(5),
        || async { wl.obtain(&ep, Some(&token), 600).await.is_ok() },
    )
    .await;
}

/// The gRPC frame of a CreateCertificate request for `csr`.
fn grpc_frame(csr: String) -> Bytes {
    use prost::Message;
    let msg = meshsign::proto::IstioCertificateRequest {
        csr,
        validity_duration: 600,
        metadata: None,
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    Bytes::from(frame)
}

#[tokio::test]
async fn shutdown_finishes_calls_in_flight_and_is_bounded() {
    let ts = TestServer::dev("limits: { drain_timeout: 2s, body_timeout: 20s }\n").await;
    let token = ts.token("default", "sleep");
    let wl = Workload::new("default", "sleep", WorkloadKeyType::EcdsaP256);
    // A call in flight: headers sent, body not yet.
    let mut conn = RawConn::open(&ts).await;
    let (response, mut body) = conn.open_stream(&token).await.unwrap();
    // A second one that will never send its body.
    let mut stuck = RawConn::open(&ts).await;
    let (_stuck_response, _stuck_body) = stuck.open_stream(&token).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let addr = ts.server.local_addr;
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(ts.server.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The listener is closed at once: no new connections.
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown began"
    );
    // The call in flight is finished and answered during the drain.
    body.send_data(grpc_frame(wl.csr()), true).unwrap();
    let response = response.await.expect("the in-flight call is answered");
    assert_eq!(response.status(), 200);
    let mut recv = response.into_body();
    let mut got = 0;
    while let Some(chunk) = recv.data().await {
        got += chunk.unwrap().len();
    }
    let trailers = recv.trailers().await.unwrap().expect("trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..]),
        "{trailers:?}"
    );
    assert!(got > 500, "a certificate chain was returned ({got} bytes)");
    // The stuck call cannot hold the shutdown past drain_timeout.
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("shutdown bounded by drain_timeout")
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
        "shutdown took {took:?} with a stuck call and drain_timeout 2s"
    );
}

#[tokio::test]
async fn a_connection_that_keeps_being_refused_is_sent_away() {
    let ts = TestServer::dev("limits: { refusal_budget: { per_second: 0.01, burst: 5 } }\n").await;
    let wl = Workload::new("default", "sleep", WorkloadKeyType::EcdsaP256);
    let flood = meshsign::client::channel(&ts.endpoint()).await.unwrap();
    let legit = meshsign::client::channel(&ts.endpoint()).await.unwrap();
    let token = ts.token("default", "sleep");
    // Token-less calls: refused, each spending the connection's budget.
    for _ in 0..6 {
        assert!(wl.send_on(&flood, None).await.is_err());
    }
    common::eventually("GOAWAY for refusals", Duration::from_secs(5), || async {
        ts.metric("meshsign_connections_closed_total{reason=\"refusal_budget\"}")
            .await
            == 1.0
    })
    .await;
    // A caller whose calls succeed is not touched, and the sent-away client
    // is served again on a new connection (tonic reconnects).
    for _ in 0..10 {
        wl.send_on(&legit, Some(&token)).await.unwrap();
    }
    wl.send_on(&flood, Some(&token)).await.unwrap();
    assert_eq!(
        ts.metric("meshsign_connections_closed_total{reason=\"refusal_budget\"}")
            .await,
        1.0
    );
}

/// Not an `IstioCertificateRequest`: its field 1 (the CSR, a string) holds
/// bytes that are not UTF-8, so the message does not decode.
#[derive(Clone, PartialEq, prost::Message)]
struct NotUtf8Csr {
    #[prost(bytes = "vec", tag = "1")]
    csr: Vec<u8>,
}

#[tokio::test]
async fn messages_that_do_not_decode_spend_the_refusal_budget() {
    let ts = TestServer::dev("limits: { refusal_budget: { per_second: 0.01, burst: 5 } }\n").await;
    let flood = meshsign::client::channel(&ts.endpoint()).await.unwrap();
    for _ in 0..6 {
        let mut grpc = tonic::client::Grpc::new(flood.clone());
        grpc.ready().await.unwrap();
        let answer: Result<tonic::Response<meshsign::proto::IstioCertificateResponse>, _> = grpc
            .unary(
                tonic::Request::new(NotUtf8Csr {
                    csr: vec![0xff; 16],
                }),
                http::uri::PathAndQuery::from_static(
                    "/istio.v1.auth.IstioCertificateService/CreateCertificate",
                ),
                tonic_prost::ProstCodec::default(),
            )
            .await;
        // grpc-go's (istiod's) code for a request that does not unmarshal.
        assert_eq!(answer.unwrap_err().code(), Code::Internal);
    }
    assert!(
        ts.metric("meshsign_requests_refused_early_total{reason=\"decode\"}")
            .await
            >= 5.0
    );
    common::eventually(
        "GOAWAY for undecodable messages",
        Duration::from_secs(5),
        || async {
            ts.metric("meshsign_connections_closed_total{reason=\"refusal_budget\"}")
                .await
                == 1.0
        },
    )
    .await;
}

#[tokio::test]
async fn an_oversized_message_is_refused_by_its_prefix_or_by_its_bytes() {
    let ts = TestServer::dev("limits: { max_request_bytes: 8192 }\n").await;
    let token = ts.token("default", "sleep");
    let mut conn = RawConn::open(&ts).await;
    // A prefix declaring 1 MiB: refused on the first bytes, the rest never sent.
    let (response, mut body) = conn.open_stream(&token).await.unwrap();
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&(1u32 << 20).to_be_bytes());
    body.send_data(Bytes::from(prefix), false).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("answered without the body")
        .unwrap();
    assert_eq!(grpc_status(&response), Some(Code::ResourceExhausted));
    // A prefix that lies (declares 10 bytes, sends 20 KiB): refused once the
    // bytes pass the limit.
    let (response, mut body) = conn.open_stream(&token).await.unwrap();
    let mut data = vec![0u8];
    data.extend_from_slice(&10u32.to_be_bytes());
    data.extend(std::iter::repeat_n(0u8, 20 * 1024));
    body.send_data(Bytes::from(data), true).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(grpc_status(&response), Some(Code::ResourceExhausted));
    assert_eq!(
        ts.metric("meshsign_requests_refused_early_total{reason=\"too_large\"}")
            .await,
        2.0
    );
}
