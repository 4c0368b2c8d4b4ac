//! MQTT over QUIC (`quic://`): noq with rustls (TLS 1.3, ring, ALPN `mqtt`) and CUBIC.
//!
//! A [`Quic`] belongs to one [`super::Connector`] and is shared by its clones: the UDP socket
//! (one noq endpoint per address family, bound on first use; or several, taken in turn, with
//! [`super::QuicOptions::sockets`]), the TLS configuration and with it the session-ticket
//! cache. A second connection through the same connector resumes the TLS
//! session and sends its first bytes (CONNECT) as 0-RTT early data.
//!
//! The first bidirectional stream carries the MQTT connection ([`QuicStream`], a byte stream);
//! in multi-stream mode the client opens data streams after CONNACK ([`QuicConnection`]).
//!
//! 0-RTT: a server may refuse early data and still accept the connection (after a restart it
//! no longer knows the ticket). The control stream keeps every byte written before the
//! handshake settles; on rejection it opens a new stream and writes them again, so the client
//! above never notices. Reading waits until the handshake has settled, which costs nothing:
//! the server's answer cannot arrive earlier.
//!
//! A client certificate ([`TlsOptions::cert_file`]) is presented as over TLS. In TLS 1.3 the
//! server checks it only after the client's handshake is complete, so a server that refuses it
//! closes the connection with a TLS alert while the control stream is in use; the stream's
//! error is then [`TransportError::Tls`], as over TLS.
//!
//! QUIC has no RST: a host where nothing listens stays silent. The handshake is bounded by
//! [`HANDSHAKE_TIMEOUT`] (and the endpoint's own set-up limit), which then reads as
//! [`TransportError::Timeout`].

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use noq::{ConnectionError, RecvStream, SendStream, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{AlertDescription, CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::lookup_host;
use tokio::task::JoinSet;

use super::tls::{self, CertCheck, TlsError};
use super::{Endpoint, TlsOptions, TlsVersion, TransportError};

/// The ALPN protocol of MQTT over QUIC.
pub const ALPN: &[u8] = b"mqtt";

/// The longest a QUIC handshake may take before the server counts as unreachable (within
/// [`Endpoint::timeout`], if that is shorter).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The client's idle timeout; the connection uses the lower of the two sides' values.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// QUIC PINGs keep an idle connection alive below common server idle timeouts (30 s), whatever
/// the MQTT keep alive.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The receive and send buffers asked of each UDP socket: a server's first flight is a few
/// datagrams per connection, and a burst of handshakes through one socket overflows the
/// kernel's default (208 KiB). The kernel caps it at `net.core.rmem_max` / `wmem_max`.
const SOCKET_BUFFER: usize = 2 << 20;

/// The QUIC application error code by which a server refuses a client before MQTT: MQTT's
/// not authorized.
pub(super) const NOT_AUTHORIZED: u32 = 0x87;

/// What happened to the 0-RTT data of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ZeroRtt {
    /// Not tried: no session ticket for the server was cached.
    NotAttempted,
    /// Sent, and the handshake has not finished yet.
    Pending,
    /// The server took the early data (CONNECT arrived in the first flight).
    Accepted,
    /// The server refused it; the data went again after the handshake.
    Rejected,
}

impl ZeroRtt {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => Self::Pending,
            2 => Self::Accepted,
            3 => Self::Rejected,
            _ => Self::NotAttempted,
        }
    }
}

/// What a connection's transport says about itself, readable while the connection lives.
#[derive(Debug, Default)]
pub struct QuicInfo {
    zero_rtt: AtomicU8,
}

impl QuicInfo {
    /// What happened to the 0-RTT data.
    pub fn zero_rtt(&self) -> ZeroRtt {
        ZeroRtt::from_u8(self.zero_rtt.load(Ordering::Relaxed))
    }

    fn set(&self, state: ZeroRtt) {
        self.zero_rtt.store(state as u8, Ordering::Relaxed);
    }
}

/// The QUIC side of a connector: sockets, TLS configuration, session tickets.
pub(super) struct Quic {
    config: noq::ClientConfig,
    checks: Arc<CheckRecorder>,
    server_name: String,
    /// IPv4 and IPv6 endpoints for each socket, bound when first needed (binding needs the
    /// runtime).
    endpoints: Mutex<Vec<[Option<noq::Endpoint>; 2]>>,
    /// Which socket the next connection takes.
    next: AtomicUsize,
    /// The address the last handshake succeeded with: later connections go straight there,
    /// with 0-RTT, instead of racing every address of the host.
    last_good: Mutex<Option<SocketAddr>>,
}

impl Quic {
    pub(super) fn new(
        host: &str,
        options: &TlsOptions,
        sockets: u16,
    ) -> Result<Self, TransportError> {
        tls::server_name(host)?;
        if options.version == Some(TlsVersion::Tls12) {
            return Err(TransportError::TlsConfig(
                "QUIC runs on TLS 1.3 only: --tls-version tlsv1.2 cannot apply".into(),
            ));
        }
        let checks = Arc::new(CheckRecorder {
            inner: tls::verifier(options)?,
            last: Mutex::new(None),
        });
        let mut rustls = tls::client_config(options, &[&rustls::version::TLS13], checks.clone())?;
        rustls.alpn_protocols = vec![ALPN.to_vec()];
        rustls.enable_early_data = true;
        let crypto = noq::crypto::rustls::QuicClientConfig::try_from(Arc::new(rustls))
            .map_err(|e| TransportError::TlsConfig(e.to_string()))?;
        let mut transport = noq::TransportConfig::default();
        transport
            .congestion_controller_factory(Arc::new(noq::congestion::CubicConfig::default()))
            .max_idle_timeout(noq::IdleTimeout::try_from(IDLE_TIMEOUT).ok())
            .keep_alive_interval(Some(KEEP_ALIVE))
            // The server opens no streams in MQTT over QUIC.
            .max_concurrent_bidi_streams(VarInt::from_u32(0))
            .max_concurrent_uni_streams(VarInt::from_u32(0));
        let mut config = noq::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        Ok(Self {
            config,
            checks,
            server_name: host.to_owned(),
            endpoints: Mutex::new(vec![[None, None]; usize::from(sockets.max(1))]),
            next: AtomicUsize::new(0),
            last_good: Mutex::new(None),
        })
    }

    /// The endpoint for `addr`'s family, on the next socket in turn.
    fn endpoint(&self, addr: SocketAddr) -> Result<noq::Endpoint, TransportError> {
        let (family, bind) = match addr {
            SocketAddr::V4(_) => (0, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))),
            SocketAddr::V6(_) => (1, SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))),
        };
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % endpoints.len();
        let slot = &mut endpoints[turn][family];
        if let Some(endpoint) = slot {
            return Ok(endpoint.clone());
        }
        let endpoint =
            bind_endpoint(bind).map_err(|source| TransportError::Connect { addr, source })?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    fn connecting(&self, addr: SocketAddr) -> Result<noq::Connecting, TransportError> {
        self.endpoint(addr)?
            .connect_with(self.config.clone(), addr, &self.server_name)
            .map_err(|e| TransportError::Quic(format!("cannot connect to {addr}: {e}")))
    }

    /// Connects and opens the control stream. With a cached ticket (and a known address) the
    /// stream is ready at once and its first bytes go as 0-RTT data; otherwise the handshake
    /// completes first, racing the host's addresses.
    pub(super) async fn connect(
        &self,
        endpoint: &Endpoint,
    ) -> Result<QuicConnection, TransportError> {
        let limit = HANDSHAKE_TIMEOUT.min(endpoint.timeout);
        let timeout = || TransportError::Timeout {
            endpoint: endpoint.to_string(),
            timeout: limit,
        };
        let deadline = tokio::time::Instant::now() + limit;
        let info = Arc::new(QuicInfo::default());
        let last_good = *self.last_good.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(addr) = last_good {
            match self.connecting(addr)?.into_0rtt() {
                Ok((conn, accepted)) => {
                    info.set(ZeroRtt::Pending);
                    let (send, recv) = conn.open_bi().await.map_err(|e| self.classify(&e))?;
                    let early = Early::Pending(Box::new(Pending {
                        accepted,
                        written: BytesMut::new(),
                        conn: conn.clone(),
                        deadline: Box::pin(tokio::time::sleep_until(deadline)),
                        endpoint: endpoint.to_string(),
                        limit,
                        checks: self.checks.clone(),
                        info: info.clone(),
                    }));
                    return Ok(QuicConnection::new(conn, send, recv, early, info));
                }
                // No ticket: an ordinary handshake, with this address alone.
                Err(connecting) => {
                    let conn = tokio::time::timeout_at(deadline, connecting)
                        .await
                        .map_err(|_| timeout())?
                        .map_err(|e| self.classify(&e))?;
                    return self.opened(conn, info, deadline, timeout).await;
                }
            }
        }
        let addrs: Vec<SocketAddr> = lookup_host((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|source| TransportError::Resolve {
                host: endpoint.host.clone(),
                source,
            })?
            .collect();
        let (addr, conn) = tokio::time::timeout_at(deadline, self.race(&addrs))
            .await
            .map_err(|_| timeout())??;
        *self.last_good.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
        self.opened(conn, info, deadline, timeout).await
    }

    /// Opens the control stream on a connection whose handshake is complete.
    async fn opened(
        &self,
        conn: noq::Connection,
        info: Arc<QuicInfo>,
        deadline: tokio::time::Instant,
        timeout: impl Fn() -> TransportError,
    ) -> Result<QuicConnection, TransportError> {
        info.set(ZeroRtt::NotAttempted);
        let (send, recv) = tokio::time::timeout_at(deadline, conn.open_bi())
            .await
            .map_err(|_| timeout())?
            .map_err(|e| self.classify(&e))?;
        Ok(QuicConnection::new(conn, send, recv, Early::Settled, info))
    }

    /// Handshakes with every address at once; the first to finish wins, the others are
    /// dropped (and so closed). With every one failing, the first address's error.
    async fn race(
        &self,
        addrs: &[SocketAddr],
    ) -> Result<(SocketAddr, noq::Connection), TransportError> {
        let mut tasks = JoinSet::new();
        let mut first_error = None;
        for (i, addr) in addrs.iter().enumerate() {
            match self.connecting(*addr) {
                Ok(connecting) => {
                    tasks.spawn(async move { (i, connecting.await) });
                }
                Err(e) => {
                    first_error.get_or_insert((i, e));
                }
            }
        }
        while let Some(joined) = tasks.join_next().await {
            let Ok((i, result)) = joined else { continue };
            match result {
                Ok(conn) => return Ok((addrs[i], conn)),
                Err(e) => {
                    let e = self.classify(&e);
                    if first_error.as_ref().is_none_or(|(j, _)| i < *j) {
                        first_error = Some((i, e));
                    }
                }
            }
        }
        Err(first_error.map_or_else(
            || TransportError::Quic(format!("no address for {}", self.server_name)),
            |(_, e)| e,
        ))
    }

    fn classify(&self, error: &ConnectionError) -> TransportError {
        classify(error, &self.checks)
    }
}

/// What a QUIC connection error means for a client that is setting up.
fn classify(error: &ConnectionError, checks: &CheckRecorder) -> TransportError {
    match error {
        // Our side refused the server's certificate.
        ConnectionError::TransportError(e) => match alert(e.code) {
            Some(alert) if is_certificate_alert(alert) => {
                let (check, detail) = checks
                    .last()
                    .unwrap_or((CertCheck::Other, e.reason.clone()));
                TransportError::Tls(TlsError::Certificate { check, detail })
            }
            Some(_) => TransportError::Tls(TlsError::Handshake(e.reason.clone())),
            None => TransportError::Quic(e.to_string()),
        },
        // The server aborted the handshake (it wants a client certificate, or no common ALPN).
        ConnectionError::ConnectionClosed(close) => match server_alert(close) {
            Some(tls) => TransportError::Tls(tls),
            None => TransportError::Quic(error.to_string()),
        },
        other => TransportError::Quic(other.to_string()),
    }
}

/// The TLS alert by which the server closed the connection, if it closed it with one.
fn server_alert(close: &noq::ConnectionClose) -> Option<TlsError> {
    let alert = alert(close.error_code)?;
    let reason = String::from_utf8_lossy(&close.reason);
    Some(TlsError::Alert(match reason.is_empty() {
        true => format!("{alert:?}"),
        false => format!("{alert:?} ({reason})"),
    }))
}

/// A stream's I/O error, as the transport's own error if the server closed the connection
/// with a TLS alert, or with the application error 0x87 (not authorized: a peer-to-peer node
/// the broker does not allow). In TLS 1.3 the client's handshake is complete before the server
/// has checked the client's certificate, so a server that refuses it (none, or one from
/// another CA) says so on the first read or write of a stream, as it does over TLS.
fn with_alert(error: io::Error) -> io::Error {
    let lost = error.get_ref().and_then(|e| {
        match (
            e.downcast_ref::<noq::ReadError>(),
            e.downcast_ref::<noq::WriteError>(),
        ) {
            (Some(noq::ReadError::ConnectionLost(lost)), _)
            | (_, Some(noq::WriteError::ConnectionLost(lost))) => Some(lost),
            _ => None,
        }
    });
    let close = match lost {
        Some(ConnectionError::ConnectionClosed(close)) => close,
        Some(ConnectionError::ApplicationClosed(close))
            if u64::from(close.error_code) == u64::from(NOT_AUTHORIZED) =>
        {
            let reason = String::from_utf8_lossy(&close.reason).into_owned();
            return io_error(error.kind(), TransportError::Refused(reason));
        }
        _ => return error,
    };
    match server_alert(close) {
        Some(tls) => io_error(error.kind(), TransportError::Tls(tls)),
        None => error,
    }
}

/// The TLS alert a QUIC CRYPTO_ERROR (0x100-0x1ff) carries.
fn alert(code: noq::TransportErrorCode) -> Option<AlertDescription> {
    let code = u64::from(code);
    (0x100..=0x1ff)
        .contains(&code)
        .then(|| AlertDescription::from((code & 0xff) as u8))
}

fn is_certificate_alert(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::DecryptError
    )
}

/// Verifies as `inner` does and remembers the last certificate error, so that a failed QUIC
/// handshake (whose error is only a TLS alert) can say which check failed. One recorder serves
/// every connection of a connector, which all go to the same server: the same certificate
/// fails the same check.
#[derive(Debug)]
struct CheckRecorder {
    inner: Arc<dyn ServerCertVerifier>,
    last: Mutex<Option<CertificateError>>,
}

impl CheckRecorder {
    fn last(&self) -> Option<(CertCheck, String)> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let TlsError::Certificate { check, detail } =
            TlsError::from_rustls(&rustls::Error::InvalidCertificate(last.clone()?))
        else {
            return None;
        };
        Some((check, detail))
    }
}

impl ServerCertVerifier for CheckRecorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if let Err(rustls::Error::InvalidCertificate(e)) = &result {
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A QUIC connection MQTT runs over: noq's own (`quic://`) or a peer-to-peer node's
/// (`p2p://`), whose streams are noq's as well.
#[derive(Clone)]
pub(crate) enum QuicConn {
    /// A `quic://` connection.
    Noq(noq::Connection),
    /// A `p2p://` connection, and the node it belongs to: the node's sockets must outlive
    /// the connection, whoever drops the connector.
    #[cfg(feature = "p2p")]
    P2p {
        /// The connection.
        conn: mqttd_p2p::Connection,
        /// Held, not used.
        _node: mqttd_p2p::Node,
    },
}

impl QuicConn {
    async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        match self {
            Self::Noq(conn) => conn.open_bi().await,
            #[cfg(feature = "p2p")]
            Self::P2p { conn, .. } => conn.open_bi().await,
        }
    }

    fn close(&self, code: u32, reason: &[u8]) {
        match self {
            Self::Noq(conn) => conn.close(VarInt::from_u32(code), reason),
            #[cfg(feature = "p2p")]
            Self::P2p { conn, .. } => conn.close(code, reason),
        }
    }
}

/// An established (or 0-RTT) QUIC connection and its control stream.
pub(crate) struct QuicConnection {
    pub(crate) conn: QuicConn,
    pub(crate) control: QuicStream,
    pub(crate) info: Arc<QuicInfo>,
}

impl QuicConnection {
    fn new(
        conn: noq::Connection,
        send: SendStream,
        recv: RecvStream,
        early: Early,
        info: Arc<QuicInfo>,
    ) -> Self {
        Self {
            conn: QuicConn::Noq(conn),
            control: QuicStream {
                send: QuicSend::new(send),
                recv,
                early,
            },
            info,
        }
    }

    /// A connection whose handshake is complete, with its control stream (no 0-RTT).
    #[cfg(feature = "p2p")]
    pub(crate) fn settled(conn: QuicConn, send: SendStream, recv: RecvStream) -> Self {
        Self {
            conn,
            control: QuicStream::settled(send, recv),
            info: Arc::new(QuicInfo::default()),
        }
    }
}

/// Opens a data stream (after CONNACK: the handshake is over, so no 0-RTT concerns).
pub(crate) async fn open_data_stream(
    conn: &QuicConn,
) -> Result<(QuicSend, RecvStream), ConnectionError> {
    let (send, recv) = conn.open_bi().await?;
    Ok((QuicSend::new(send), recv))
}

/// Closes the connection once its streams are done: code 0, no reason.
pub(crate) fn close(conn: &QuicConn) {
    conn.close(0, b"");
}

/// The sending half of a stream whose shutdown waits until the server has received
/// everything: closing the connection earlier would discard data still in flight (a
/// DISCONNECT, a last QoS 0 message).
pub(crate) struct QuicSend {
    send: SendStream,
    stopped: Option<Pin<Box<noq::Stopped>>>,
}

impl QuicSend {
    fn new(send: SendStream) -> Self {
        Self {
            send,
            stopped: None,
        }
    }
}

impl AsyncWrite for QuicSend {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.stopped.is_none() {
            // Already finished or reset: nothing more will be acknowledged.
            if self.send.finish().is_err() {
                return Poll::Ready(Ok(()));
            }
            self.stopped = Some(Box::pin(self.send.stopped()));
        }
        match &mut self.stopped {
            // Acknowledged, stopped by the server, or the connection is gone: done either way.
            Some(stopped) => stopped.as_mut().poll(cx).map(|_| Ok(())),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// Where the control stream is with its 0-RTT data.
enum Early {
    /// The handshake is complete: nothing to replay.
    Settled,
    /// The stream was opened in 0-RTT; the handshake has not finished.
    Pending(Box<Pending>),
    /// The server refused the early data: a new stream is being opened.
    Reopening(Box<Reopening>),
    /// The new stream is getting the bytes written before.
    Replaying(BytesMut),
}

struct Pending {
    accepted: noq::ZeroRttAccepted,
    /// Everything written so far, to write again if the server refuses it.
    written: BytesMut,
    conn: noq::Connection,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// The endpoint and the handshake limit, for the timeout's error.
    endpoint: String,
    limit: Duration,
    checks: Arc<CheckRecorder>,
    info: Arc<QuicInfo>,
}

type OpenBi =
    Pin<Box<dyn Future<Output = Result<(SendStream, RecvStream), ConnectionError>> + Send>>;

struct Reopening {
    open: OpenBi,
    written: BytesMut,
    checks: Arc<CheckRecorder>,
}

/// The control stream as a byte stream, replaying its 0-RTT bytes if the server refused them.
pub struct QuicStream {
    send: QuicSend,
    recv: RecvStream,
    early: Early,
}

impl std::fmt::Debug for QuicStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicStream")
            .field("stream", &self.recv.id())
            .finish_non_exhaustive()
    }
}

/// A transport error in an I/O error, for [`crate::connect`] to report as it is.
fn io_error(kind: io::ErrorKind, error: TransportError) -> io::Error {
    io::Error::new(kind, error)
}

impl QuicStream {
    /// A byte stream on a stream of a connection whose handshake is over (nothing sent early to
    /// settle), such as one a peer-to-peer node opened. Like every `QuicStream`, its shutdown
    /// waits until the peer has received everything written, so that closing the connection
    /// right after does not discard a last packet (a DISCONNECT).
    pub fn settled(send: SendStream, recv: RecvStream) -> Self {
        Self {
            send: QuicSend::new(send),
            recv,
            early: Early::Settled,
        }
    }

    /// Drives the 0-RTT outcome: ready once the stream is settled (accepted, or replayed on a
    /// new stream); an error if the handshake failed or timed out.
    fn poll_settle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.early {
                Early::Settled => return Poll::Ready(Ok(())),
                Early::Pending(p) => {
                    if let Poll::Ready(accepted) = Pin::new(&mut p.accepted).poll(cx) {
                        if accepted {
                            p.info.set(ZeroRtt::Accepted);
                            self.early = Early::Settled;
                            continue;
                        }
                        if let Some(reason) = p.conn.close_reason() {
                            let error = classify(&reason, &p.checks);
                            return Poll::Ready(Err(io_error(io::ErrorKind::NotConnected, error)));
                        }
                        p.info.set(ZeroRtt::Rejected);
                        let conn = p.conn.clone();
                        let open: OpenBi = Box::pin(async move { conn.open_bi().await });
                        let written = std::mem::take(&mut p.written);
                        let checks = p.checks.clone();
                        self.early = Early::Reopening(Box::new(Reopening {
                            open,
                            written,
                            checks,
                        }));
                        continue;
                    }
                    if p.deadline.as_mut().poll(cx).is_ready() {
                        let error = TransportError::Timeout {
                            endpoint: p.endpoint.clone(),
                            timeout: p.limit,
                        };
                        return Poll::Ready(Err(io_error(io::ErrorKind::TimedOut, error)));
                    }
                    return Poll::Pending;
                }
                Early::Reopening(r) => match ready!(r.open.as_mut().poll(cx)) {
                    Ok((send, recv)) => {
                        self.send = QuicSend::new(send);
                        self.recv = recv;
                        self.early = Early::Replaying(std::mem::take(&mut r.written));
                    }
                    Err(e) => {
                        let error = classify(&e, &r.checks);
                        return Poll::Ready(Err(io_error(io::ErrorKind::NotConnected, error)));
                    }
                },
                Early::Replaying(written) => {
                    while !written.is_empty() {
                        let n = ready!(Pin::new(&mut self.send).poll_write(cx, written))?;
                        written.advance(n);
                    }
                    self.early = Early::Settled;
                }
            }
        }
    }
}

/// Whether a write failed only because the server refused the 0-RTT data.
fn is_zero_rtt_rejected(error: &io::Error) -> bool {
    error
        .get_ref()
        .and_then(|e| e.downcast_ref::<noq::WriteError>())
        .is_some_and(|e| matches!(e, noq::WriteError::ZeroRttRejected))
}

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_settle(cx))?;
        AsyncRead::poll_read(Pin::new(&mut self.recv), cx, buf).map_err(with_alert)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match this.poll_settle(cx) {
            Poll::Ready(result) => {
                result?;
                Pin::new(&mut this.send)
                    .poll_write(cx, buf)
                    .map_err(with_alert)
            }
            Poll::Pending => {
                let Early::Pending(p) = &mut this.early else {
                    return Poll::Pending;
                };
                match ready!(Pin::new(&mut this.send).poll_write(cx, buf)) {
                    Ok(n) => {
                        p.written.extend_from_slice(&buf[..n]);
                        Poll::Ready(Ok(n))
                    }
                    // The refusal is seen here before the handshake's verdict; the verdict
                    // (whose waker is registered) leads to the replay.
                    Err(e) if is_zero_rtt_rejected(&e) => Poll::Pending,
                    Err(e) => Poll::Ready(Err(with_alert(e))),
                }
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_settle(cx))?;
        Pin::new(&mut self.send).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_settle(cx))?;
        Pin::new(&mut self.send).poll_shutdown(cx)
    }
}

/// A client endpoint on a UDP socket bound to `bind`, with [`SOCKET_BUFFER`]s.
fn bind_endpoint(bind: SocketAddr) -> io::Result<noq::Endpoint> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: the kernel may cap them, and the defaults still work.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&bind.into())?;
    noq::Endpoint::new(
        noq::EndpointConfig::default(),
        None,
        socket.into(),
        Arc::new(noq::TokioRuntime),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_error_codes_carry_their_alert() {
        let code = noq::TransportErrorCode::crypto(48);
        assert_eq!(alert(code), Some(AlertDescription::UnknownCA));
        assert!(is_certificate_alert(AlertDescription::UnknownCA));
        assert_eq!(alert(noq::TransportErrorCode::PROTOCOL_VIOLATION), None);
    }

    #[test]
    fn zero_rtt_state_round_trips() {
        let info = QuicInfo::default();
        assert_eq!(info.zero_rtt(), ZeroRtt::NotAttempted);
        for state in [ZeroRtt::Pending, ZeroRtt::Accepted, ZeroRtt::Rejected] {
            info.set(state);
            assert_eq!(info.zero_rtt(), state);
        }
    }
}
