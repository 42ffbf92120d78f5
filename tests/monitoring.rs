//! The monitoring endpoint (`/metrics`, `/healthz/*`) cannot be held: idle
//! and slow connections are closed after the header deadline, and past the
//! connection limit new connections are closed at once.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use meshsign::metrics::{MONITORING_HEADER_TIMEOUT, MONITORING_MAX_CONNECTIONS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until EOF (or the deadline); returns when the server closed.
async fn closed_within(stream: &mut TcpStream, deadline: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(
            deadline.saturating_sub(start.elapsed()),
            stream.read(&mut buf),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn idle_slow_and_excess_monitoring_connections_are_closed() {
    let ts = TestServer::dev("").await;
    let addr = ts.server.monitoring_addr.expect("monitoring");

    // Idle, and a request whose headers trickle in: both cut at the deadline.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let limit = MONITORING_HEADER_TIMEOUT + Duration::from_secs(3);
    let (a, b) = tokio::join!(
        closed_within(&mut idle, limit),
        closed_within(&mut slow, limit)
    );
    for (what, t) in [("idle", a), ("slow headers", b)] {
        let t = t.unwrap_or_else(|| panic!("{what} connection still open after {limit:?}"));
        assert!(
            t >= MONITORING_HEADER_TIMEOUT - Duration::from_millis(500),
            "{what} closed too early: {t:?}"
        );
    }

    // Fill every slot; the next connection is closed at once.
    let mut held = Vec::new();
    for _ in 0..MONITORING_MAX_CONNECTIONS {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut excess = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(&mut excess, Duration::from_secs(2))
            .await
            .is_some(),
        "a connection past the limit was kept"
    );
    // Released slots serve scrapes again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ts.metric("citadel_server_csr_count").await, 0.0);
}

#[tokio::test]
async fn a_token_less_flood_writes_a_bounded_number_of_log_lines() {
    // The failed-authentication budget would turn most of this flood into
    // RESOURCE_EXHAUSTED (tests/limits.rs): off, so every call is a refusal
    // that wants a log line.
    let ts = std::sync::Arc::new(
        TestServer::dev("rate_limits: { failed_auth_per_address: { per_second: 0 } }\n").await,
    );
    let wl = std::sync::Arc::new(common::Workload::new(
        "default",
        "flood",
        meshsign::client::WorkloadKeyType::EcdsaP256,
    ));
    let started = Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (ts, wl) = (ts.clone(), wl.clone());
            tokio::spawn(async move {
                let channel = meshsign::client::channel(&ts.endpoint()).await.unwrap();
                for _ in 0..50 {
                    assert_eq!(
                        wl.send_on(&channel, None).await,
                        Err(tonic::Code::Unauthenticated)
                    );
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let seconds = started.elapsed().as_secs() + 1;
    let suppressed = ts.metric("meshsign_log_lines_suppressed_total").await as u64;
    // 1000 refusals; at most REFUSAL_LOG_PER_SECOND lines in each second they spanned.
    let budget = u64::from(meshsign::server::service::REFUSAL_LOG_PER_SECOND) * (seconds + 1);
    assert!(
        1000 - suppressed <= budget,
        "{} lines logged in about {seconds}s",
        1000 - suppressed
    );
    assert!(suppressed > 0);
}
