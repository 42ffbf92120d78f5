//! Connection limits: past `limits.max_connections` open connections, or
//! `limits.max_concurrent_handshakes` handshakes in progress, a new
//! connection is accepted and closed at once (never left hanging), counted,
//! and the server keeps serving the connections it holds.

mod common;

use std::time::Duration;

use common::{eventually, TestServer, Workload};
use meshsign::client::WorkloadKeyType;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

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
async fn stalled_handshakes_cannot_take_more_than_their_share() {
    let ts =
        TestServer::dev("limits: { max_concurrent_handshakes: 2, handshake_timeout: 1s }\n").await;
    let wl = Workload::new("default", "sleep", WorkloadKeyType::EcdsaP256);
    let token = ts.token("default", "sleep");
    // Two connections that never send a ClientHello hold both slots...
    let _stalled: Vec<TcpStream> = vec![
        TcpStream::connect(ts.server.local_addr).await.unwrap(),
        TcpStream::connect(ts.server.local_addr).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...so a third is closed at once rather than queued behind them.
    let mut third = TcpStream::connect(ts.server.local_addr).await.unwrap();
    assert!(closed_at_once(&mut third, Duration::from_millis(500)).await);
    assert!(
        ts.metric("meshsign_connections_refused_total{reason=\"max_handshakes\"}")
            .await
            >= 1.0
    );
    // The handshake deadline frees the slots; workloads get through again.
    eventually("slots never freed", Duration::from_secs(5), || async {
        wl.obtain(&ts.endpoint(), Some(&token), 600).await.is_ok()
    })
    .await;
}
