//! The transport: accepting TCP connections, the TLS handshake, and what the
//! rest of the server learns about a connection ([`PeerInfo`]).
//!
//! TLS 1.2 and 1.3 with ALPN `h2` (gRPC clients require it). Client
//! certificates are requested and, when given, verified against the mesh roots
//! (istiod's `VerifyClientCertIfGiven`); a connection without one is still
//! accepted so bearer tokens can authenticate. Handshakes run in their own
//! tasks with a timeout, so a slow or hostile client cannot stall the accept loop.
//!
//! The serving certificate comes from a [`ServingCertificate`] that can be
//! swapped at any time (renewal) without touching open connections.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::coalesce::Coalesce;
use super::fair_read::FairRead;
use crate::auth::ClientChain;
use crate::pki::RootsId;

/// What the server knows about the other end of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// False only on the insecure plaintext listener.
    pub tls: bool,
    /// The client's certificate chain, if it sent one, verified at the
    /// handshake. Checked again on every request (validity, current roots):
    /// a connection, or a resumed TLS session, outliving the certificate or
    /// its root must not keep its identity.
    pub client_chain: Option<Arc<ClientChain>>,
}

/// The TLS settings new connections are accepted with. Replaced as a whole
/// when the roots change, which also starts a new session cache and ticket
/// key: no session from before the change can be resumed.
#[derive(Debug)]
pub struct TlsSettings {
    pub config: Arc<rustls::ServerConfig>,
    /// The roots the client-certificate verifier of `config` trusts.
    pub roots: RootsId,
}

/// An accepted connection, TLS or (insecure mode) plaintext, holding its
/// slot under `limits.max_connections` (a TLS one in its [`MovableTcp`]; a
/// plaintext one in the third field) until it is closed.
pub enum Conn {
    Tls(Box<Coalesce<FairRead<TlsStream<MovableTcp>>>>, PeerInfo),
    Plain(
        Coalesce<FairRead<TcpStream>>,
        PeerInfo,
        OwnedSemaphorePermit,
    ),
}

impl Conn {
    pub fn peer(&self) -> &PeerInfo {
        match self {
            Conn::Tls(_, p) | Conn::Plain(_, p, _) => p,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Plain(s, _, _) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Plain(s, _, _) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Plain(s, _, _) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Plain(s, _, _) => Pin::new(s).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Conn::Plain(s, _, _) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tls(s, _) => s.is_write_vectored(),
            Conn::Plain(s, _, _) => s.is_write_vectored(),
        }
    }
}

/// The serving certificate and key, replaceable at run time.
#[derive(Debug)]
pub struct ServingCertificate {
    current: ArcSwap<CertifiedKey>,
}

impl ServingCertificate {
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(key),
        })
    }

    pub fn replace(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

#[derive(Debug)]
struct Resolver(Arc<ServingCertificate>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

/// Builds a `CertifiedKey` from a chain and a PKCS#8/PKCS#1/SEC1 DER key.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, String> {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("unusable serving key: {e}"))?;
    Ok(CertifiedKey::new(chain, signing_key))
}

/// The rustls server configuration: TLS 1.2+, ALPN h2, optional client
/// certificates verified against `client_roots`.
pub fn server_config(
    serving: Arc<ServingCertificate>,
    client_roots: &[CertificateDer<'static>],
    request_client_certs: bool,
) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let mut config = if request_client_certs {
        let mut roots = RootCertStore::empty();
        for root in client_roots {
            roots
                .add(root.clone())
                .map_err(|e| format!("root certificate unusable as a trust anchor: {e}"))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .allow_unauthenticated()
            .build()
            .map_err(|e| e.to_string())?;
        builder
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(serving)))
    } else {
        builder
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(serving)))
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(16 * 1024);
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| e.to_string())?;
    Ok(config)
}

/// Bounds on what a stranger can make the listener hold.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub handshake_timeout: Duration,
    /// Open connections (handshaking or established); past it a new
    /// connection is accepted and closed at once.
    pub max_connections: usize,
    /// TLS handshakes in progress; past it the longest-waiting handshake is
    /// closed to make room (a stalled handshake is the one a stranger holds;
    /// a real client's takes milliseconds).
    pub max_handshakes: usize,
    /// `meshsign_connections_refused_total{reason}`: max_connections, max_handshakes.
    pub refused: prometheus::IntCounterVec,
}

/// The handshakes in progress, oldest first, each with a way to cancel it.
struct Handshakes {
    max: usize,
    inner: std::sync::Mutex<HandshakeSet>,
}

#[derive(Default)]
struct HandshakeSet {
    next_id: u64,
    /// Ids in start order; ids already ended are skipped lazily.
    order: std::collections::VecDeque<u64>,
    cancel: std::collections::HashMap<u64, Arc<Notify>>,
}

/// A handshake registered by [`Handshakes::begin`].
struct Handshake {
    id: u64,
    /// Notified when the handshake is closed to make room for a newer one.
    cancelled: Arc<Notify>,
    /// Whether an older handshake was cancelled to make room for this one.
    evicted: bool,
}

impl Handshakes {
    fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            inner: std::sync::Mutex::new(HandshakeSet::default()),
        }
    }

    /// Registers a new handshake: its id, and the [`Notify`] that is
    /// notified when it is cancelled (a permit is stored, so a handshake
    /// cancelled before its task awaits it still sees it). When `max` are
    /// already in progress the oldest is cancelled (returns true then).
    fn begin(&self) -> Handshake {
        let cancelled = Arc::new(Notify::new());
        let Ok(mut set) = self.inner.lock() else {
            return Handshake {
                id: u64::MAX,
                cancelled,
                evicted: false,
            };
        };
        let mut evicted = false;
        while set.cancel.len() >= self.max {
            let Some(oldest) = set.order.pop_front() else {
                break;
            };
            if let Some(cancel) = set.cancel.remove(&oldest) {
                cancel.notify_one();
                evicted = true;
            }
        }
        if set.order.len() > 4 * self.max {
            let HandshakeSet { order, cancel, .. } = &mut *set;
            order.retain(|id| cancel.contains_key(id));
        }
        let id = set.next_id;
        set.next_id += 1;
        set.order.push_back(id);
        set.cancel.insert(id, cancelled.clone());
        Handshake {
            id,
            cancelled,
            evicted,
        }
    }

    fn end(&self, id: u64) {
        if let Ok(mut set) = self.inner.lock() {
            set.cancel.remove(&id);
        }
    }
}

/// The threads TLS handshakes run on: a small runtime of their own, at a
/// lower priority than the workers that serve established connections.
///
/// A burst of new connections (a reconnect storm, or an attacker opening
/// thousands) would otherwise queue thousands of handshake tasks on the
/// workers, ahead of the next call of every established connection; here
/// the operating system runs a worker with a call to make before the
/// handshake thread. A socket is accepted on the workers' runtime, then
/// registered with this runtime's I/O driver for its handshake (its
/// readiness events are this thread's work, not the workers'), and moves
/// back to the workers' driver once established ([`MovableTcp`]), so a busy
/// handshake thread never delays the readiness of established connections.
/// Dropping it stops its threads.
pub struct HandshakeThreads {
    runtime: Option<tokio::runtime::Runtime>,
}

impl HandshakeThreads {
    /// `threads` handshake threads, each at nice +5 relative to the process.
    pub fn start(threads: usize) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("meshsign-handshake")
            .on_thread_start(lower_thread_priority)
            .enable_all()
            .build()?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.runtime.as_ref().map(|r| r.handle().clone())
    }
}

impl Drop for HandshakeThreads {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Does not block (allowed inside an async context).
            rt.shutdown_background();
        }
    }
}

/// A TLS connection's TCP socket, which can move from one runtime's I/O
/// driver to another's, and holds the connection's slot under
/// `max_connections`.
///
/// A connection's handshake runs with its socket registered on the
/// handshake threads' driver, so the readiness events of handshakes (a
/// stalled or trickling one has many) are handled there, not by the workers
/// that serve calls; once established it moves to the workers' driver.
///
/// When dropped, the socket is closed on the handshake threads, and the slot
/// released only then. Closing a socket (taking it out of the driver's
/// epoll set, and the FIN, whose receiving side the kernel also processes
/// in this call on loopback) is most of what a connection costs to end: a
/// client closing thousands of idle connections at once (the end of the
/// idle-connection attack) would queue that on the workers, ahead of every
/// established connection's next call. On the lower-priority handshake
/// threads it waits for the workers instead. Sockets waiting to be closed
/// still hold their slots, so they are bounded by `max_connections`.
#[derive(Debug)]
pub struct MovableTcp {
    socket: Option<TcpStream>,
    /// The runtime it was registered with first (the handshake threads),
    /// where it is closed.
    closer: Option<tokio::runtime::Handle>,
    slot: Option<OwnedSemaphorePermit>,
}

impl MovableTcp {
    /// Registers `socket`, which holds connection slot `slot`, with the
    /// current runtime's driver; that runtime closes it.
    fn register_here(socket: std::net::TcpStream, slot: OwnedSemaphorePermit) -> io::Result<Self> {
        Ok(Self {
            socket: Some(TcpStream::from_std(socket)?),
            closer: tokio::runtime::Handle::try_current().ok(),
            slot: Some(slot),
        })
    }

    /// Moves the socket to `runtime`'s driver (buffered TLS state is not in
    /// the socket, so nothing is lost; a socket with data waiting is
    /// reported ready by its new registration).
    fn move_to(&mut self, runtime: &tokio::runtime::Handle) -> io::Result<()> {
        let socket = self.socket.take().ok_or_else(not_connected)?.into_std()?;
        let _entered = runtime.enter();
        self.socket = Some(TcpStream::from_std(socket)?);
        Ok(())
    }

    fn socket(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        self.socket.as_mut().map(Pin::new).ok_or_else(not_connected)
    }
}

impl Drop for MovableTcp {
    fn drop(&mut self) {
        let (socket, slot) = (self.socket.take(), self.slot.take());
        match self.closer.take() {
            // A runtime that has shut down drops the task, and so closes the
            // socket, at once.
            Some(closer) => drop(closer.spawn(async move {
                drop(socket);
                drop(slot);
            })),
            None => drop((socket, slot)),
        }
    }
}

fn not_connected() -> io::Error {
    io::Error::from(io::ErrorKind::NotConnected)
}

impl AsyncRead for MovableTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().socket() {
            Ok(s) => s.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for MovableTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().socket() {
            Ok(s) => s.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().socket() {
            Ok(s) => s.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().socket() {
            Ok(s) => s.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().socket() {
            Ok(s) => s.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
}

/// Nice +5 for the calling thread, relative to its current value (Linux:
/// per thread). Best effort.
fn lower_thread_priority() {
    // SAFETY: plain system calls on the calling thread's own id.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let current = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, (current + 5).min(19));
    }
}

/// Accepts connections on `listener` and yields them once their handshake is
/// done (on `handshake_threads`); `tls = None` serves plaintext. Connections past the limits are
/// accepted and closed at once (never left in the kernel's queue or hanging
/// in a handshake), and counted.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ArcSwap<TlsSettings>>>,
    limits: ConnLimits,
    handshake_threads: HandshakeThreads,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel::<io::Result<Conn>>(256);
    let handshake_timeout = limits.handshake_timeout;
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let handshakes = Arc::new(Handshakes::new(limits.max_handshakes));
    let refused_connections = limits.refused.with_label_values(&["max_connections"]);
    let refused_handshakes = limits.refused.with_label_values(&["max_handshakes"]);
    let on_handshake_threads = handshake_threads.handle();
    tokio::spawn(async move {
        // Owned by the accept loop: the handshake threads stop with it.
        let _handshake_threads = handshake_threads;
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                // The server stopped: close the listening socket now.
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // One accept per scheduler round (see conn::serve): a burst of
            // connects cannot hold the worker for a whole accept queue.
            tokio::task::yield_now().await;
            let Ok(slot) = connections.clone().try_acquire_owned() else {
                refused_connections.inc();
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            let Some(settings) = tls.as_ref().map(|t| t.load_full()) else {
                let peer = PeerInfo {
                    remote: Some(remote),
                    tls: false,
                    client_chain: None,
                };
                if tx
                    .send(Ok(Conn::Plain(
                        Coalesce::new(FairRead::new(tcp)),
                        peer,
                        slot,
                    )))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            };
            let Handshake {
                id,
                cancelled,
                evicted,
            } = handshakes.begin();
            if evicted {
                refused_handshakes.inc();
            }
            let handshakes = handshakes.clone();
            let acceptor = TlsAcceptor::from(settings.config.clone());
            // Leaves this runtime's driver; the handshake task registers it with its own.
            let Ok(socket) = tcp.into_std() else {
                handshakes.end(id);
                continue;
            };
            let workers = tokio::runtime::Handle::current();
            let handshake_task = async move {
                let Ok(tcp) = MovableTcp::register_here(socket, slot) else {
                    handshakes.end(id);
                    return;
                };
                let handshake = tokio::select! {
                    done = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)) => Some(done),
                    // Closed to make room for a newer handshake.
                    _ = cancelled.notified() => None,
                };
                handshakes.end(id);
                let Some(handshake) = handshake else {
                    tracing::debug!(%remote, "stalled TLS handshake closed to make room");
                    return;
                };
                match handshake {
                    Ok(Ok(mut stream)) => {
                        if let Err(e) = stream.get_mut().0.move_to(&workers) {
                            tracing::debug!(%remote, error = %e, "connection lost after its handshake");
                            return;
                        }
                        // Also for a resumed session: rustls restores the
                        // certificates the client presented originally
                        // (verified under the same settings' roots).
                        let chain = stream.get_ref().1.peer_certificates().unwrap_or(&[]);
                        let chain = chain.iter().map(|c| c.clone().into_owned()).collect();
                        let peer = PeerInfo {
                            remote: Some(remote),
                            tls: true,
                            client_chain: ClientChain::new(chain, settings.roots).map(Arc::new),
                        };
                        let _ = tx
                            .send(Ok(Conn::Tls(
                                Box::new(Coalesce::new(FairRead::new(stream))),
                                peer,
                            )))
                            .await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            };
            match &on_handshake_threads {
                Some(threads) => drop(threads.spawn(handshake_task)),
                None => drop(tokio::spawn(handshake_task)),
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A connected pair: (the client's end, the server's end).
    fn socket_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, server)
    }

    /// True when the peer of `client` has closed (EOF), without waiting.
    fn closed(client: &mut std::net::TcpStream) -> bool {
        client.set_nonblocking(true).unwrap();
        matches!(client.read(&mut [0u8; 16]), Ok(0))
    }

    #[test]
    fn a_dropped_socket_is_closed_by_its_closer_runtime_and_frees_its_slot_only_then() {
        let closer = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let workers = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let slots = Arc::new(Semaphore::new(1));
        let (mut client, server) = socket_pair();
        let mut tcp = {
            let _on_closer = closer.enter();
            MovableTcp::register_here(server, slots.clone().try_acquire_owned().unwrap()).unwrap()
        };
        // Established: it moves to the workers, and ends there.
        tcp.move_to(workers.handle()).unwrap();
        workers.block_on(async move { drop(tcp) });
        // The close is queued on the closer, which has not run yet: the
        // socket is open and the slot taken.
        assert_eq!(slots.available_permits(), 0);
        assert!(!closed(&mut client));
        closer.block_on(tokio::task::yield_now());
        assert_eq!(slots.available_permits(), 1);
        assert!(closed(&mut client));
    }

    #[test]
    fn once_its_closer_runtime_is_gone_the_socket_is_closed_where_it_is_dropped() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let slots = Arc::new(Semaphore::new(1));
        let (mut client, server) = socket_pair();
        let tcp = runtime.block_on(async {
            MovableTcp::register_here(server, slots.clone().try_acquire_owned().unwrap()).unwrap()
        });
        // The runtime it would be closed on is gone.
        drop(runtime);
        drop(tcp);
        assert_eq!(slots.available_permits(), 1);
        assert!(closed(&mut client));
    }
}
