//! An mTLS identity dies with its certificate: the client certificate's
//! validity is checked on every request, so neither a connection opened
//! while it was valid nor a resumed TLS session keeps the identity after it
//! expires.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{tls_connect, TestServer, Workload};
use hyper_util::rt::TokioIo;
use meshsign::client::{self, WorkloadKeyType};
use rustls::HandshakeKind;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;

/// A channel over one TLS connection made with `tls`; records how its
/// handshake went (full, or resumed from an earlier session's ticket).
async fn channel(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    kinds: Arc<Mutex<Vec<HandshakeKind>>>,
) -> Channel {
    let addr = addr.to_owned();
    let connector = tower::service_fn(move |_: Uri| {
        let (tls, kinds, addr) = (tls.clone(), kinds.clone(), addr.clone());
        async move {
            let stream = tls_connect(addr.as_str(), tls).await?;
            if let Some(kind) = stream.get_ref().1.handshake_kind() {
                kinds.lock().unwrap().push(kind);
            }
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
        .expect("connect")
}

#[tokio::test]
async fn an_expired_client_certificate_stops_authenticating_on_open_and_resumed_connections() {
    let ts = TestServer::dev("").await;
    let wl = Workload::new("default", "short", WorkloadKeyType::EcdsaP256);
    let token = ts.token("default", "short");
    // A certificate valid for 3 more seconds.
    let (_, issued) = wl.obtain(&ts.endpoint(), Some(&token), 3).await.unwrap();
    let mut ep = ts.endpoint();
    ep.client_identity = Some(wl.client_identity(&issued));
    let tls = Arc::new(client::client_tls_config(&ep).unwrap());
    let kinds = Arc::new(Mutex::new(Vec::new()));

    let open = channel(&ep.addr, tls.clone(), kinds.clone()).await;
    wl.send_on(&open, None)
        .await
        .expect("mTLS renewal while the certificate is valid");
    // A second connection resumes the first one's session.
    let resumed = channel(&ep.addr, tls.clone(), kinds.clone()).await;
    wl.send_on(&resumed, None)
        .await
        .expect("resumed session, certificate still valid");
    assert_eq!(
        *kinds.lock().unwrap(),
        [HandshakeKind::Full, HandshakeKind::Resumed]
    );

    let expires = issued.not_after;
    let wait = (expires - time::OffsetDateTime::now_utc()) + time::Duration::milliseconds(1500);
    tokio::time::sleep(Duration::try_from(wait).unwrap_or_default()).await;

    // The same connections, after expiry: refused.
    assert_eq!(wl.send_on(&open, None).await, Err(Code::Unauthenticated));
    assert_eq!(wl.send_on(&resumed, None).await, Err(Code::Unauthenticated));
    // A new connection resuming the old session cannot revive it either.
    let revived = channel(&ep.addr, tls.clone(), kinds.clone()).await;
    assert_eq!(kinds.lock().unwrap().last(), Some(&HandshakeKind::Resumed));
    assert_eq!(wl.send_on(&revived, None).await, Err(Code::Unauthenticated));
    // A valid token on the same connection still authenticates (istiod's
    // order: certificate, then token).
    wl.send_on(&open, Some(&token))
        .await
        .expect("token after the certificate expired");
}

#[tokio::test]
async fn connections_are_retired_at_max_connection_age() {
    let ts =
        TestServer::dev("limits: { max_connection_age: 1s, max_connection_age_grace: 1s }\n").await;
    let wl = Workload::new("default", "aged", WorkloadKeyType::EcdsaP256);
    let token = ts.token("default", "aged");
    let ep = ts.endpoint();
    let tls = Arc::new(client::client_tls_config(&ep).unwrap());
    let kinds = Arc::new(Mutex::new(Vec::new()));
    let ch = channel(&ep.addr, tls, kinds.clone()).await;
    wl.send_on(&ch, Some(&token)).await.unwrap();
    assert_eq!(kinds.lock().unwrap().len(), 1);
    // Past age + grace the server has sent GOAWAY and closed the connection:
    // the client's next call goes over a new handshake.
    tokio::time::sleep(Duration::from_secs(3)).await;
    wl.send_on(&ch, Some(&token)).await.unwrap();
    assert_eq!(kinds.lock().unwrap().len(), 2, "a new connection was made");
}
