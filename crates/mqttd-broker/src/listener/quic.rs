//! The `quic://` listener: one QUIC endpoint (noq) per listener on a UDP socket, its accept loop
//! and what each connection goes through before MQTT.
//!
//! The accept loop decides on each connection attempt before any handshake state exists: a
//! client whose address is not validated gets a stateless Retry while more than
//! `quic.retry_above_handshakes` handshakes are in progress (so a flood of spoofed Initials
//! costs the broker nothing but the Retry packets); then the broker's admission applies (the
//! per-address rate limit and the connection limit, shared with the other listeners), and a
//! refused attempt is answered with CONNECTION_REFUSED.
//!
//! In the connection's own task, the handshake runs until the client's ALPN is known; the
//! negotiated ALPN picks the protocol: `mqtt`, or `h3` (unless `quic.http3 = false`), which
//! `crate::http3` serves once the handshake is complete. For MQTT then, unless
//! client certificates are verified (`tls.ca_file`), the connection is served at once, 0-RTT:
//! CONNECT and what follows may come as early data, which cannot be replayed because session
//! tickets are single-use (see [`TlsAcceptor::quic_server_config`]). The handshake must still
//! complete within `connect_timeout` of the first packet, like the first stream and CONNECT,
//! which the core times from the same instant. SIGHUP's certificate reload gives the endpoint
//! a new server configuration; connections that are up keep theirs.
//!
//! The listener binds its UDP socket itself ([`socket`]: buffers sized by `[quic]`) and puts
//! a [`guard`] between noq and the socket, for two rules of RFC 9000 that noq 1.4 bends: no
//! Version Negotiation in answer to a datagram under 1200 bytes, and no more than three times
//! what an address sent before it is validated. The accept loop tells the guard what noq
//! decided of each attempt (validated by a token, sent a Retry, refused).

pub(crate) mod guard;
mod socket;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use noq::congestion::{CubicConfig, NewRenoConfig};
use noq::crypto::rustls::{HandshakeData, QuicServerConfig};
use noq::{
    Connecting, Connection, Endpoint, EndpointConfig, IdleTimeout, Runtime, ServerConfig,
    TokioRuntime, TransportConfig, VarInt,
};
use rustls::pki_types::CertificateDer;
use rustls::server::StoresServerSessions;
use tracing::{debug, info, warn};

use super::{admit, Admission};
use crate::broker::Inner;
use crate::config::{Config, CongestionControl, Listener};
use crate::drivers::now;
use crate::hooks::{Peer, Transport};
use crate::metrics::Metrics;
use crate::tls::TlsAcceptor;
use guard::Guard;
use socket::{Guarded, GuardedSocket};

/// The ALPN identifier of MQTT over QUIC.
const ALPN_MQTT: &[u8] = b"mqtt";
/// The ALPN identifier of HTTP/3.
const ALPN_H3: &[u8] = crate::http3::ALPN;
/// The ALPN identifiers the endpoint offers, MQTT first.
fn alpn(config: &Config) -> &'static [&'static [u8]] {
    if config.quic.http3 {
        &[ALPN_MQTT, ALPN_H3]
    } else {
        &[ALPN_MQTT]
    }
}
/// The longest MQTT keep alive there is, for the idle timeout when the broker sets no limit.
const LONGEST_KEEP_ALIVE: u64 = u16::MAX as u64;
/// Session tickets kept for resumption and 0-RTT without a connection limit.
const SESSION_CACHE: usize = 16 * 1024;
/// How long, at shutdown, the endpoint waits for its connections' closes to be sent.
const DRAIN: Duration = Duration::from_secs(2);
/// The QUIC application error code of a unidirectional stream an MQTT client opens.
const NO_UNI_STREAMS: u32 = 0x82;
/// The QUIC application error code of a connection refused for its ALPN.
const WRONG_PROTOCOL: u32 = 0x82;
/// The QUIC versions the endpoint supports: noq's default (version 1 and the drafts laid out
/// like it), set explicitly so that the guard reads the same list.
const VERSIONS: &[u32] = &[
    0x0000_0001,
    0xff00_001d,
    0xff00_001e,
    0xff00_001f,
    0xff00_0020,
    0xff00_0021,
    0xff00_0022,
];
/// Addresses not yet validated the guard tracks at most (a few MiB): beyond that, a new
/// address's Initial is dropped until a handshake ends.
const GUARD_CAPACITY: usize = 16 * 1024;
/// How long the guard tracks an address beyond the handshake's time limit: the watchdog closes
/// a late handshake at the limit, and the close goes under the guard too.
const GUARD_GRACE: Duration = Duration::from_secs(1);

/// A bound `quic://` listener.
pub(crate) struct QuicListener {
    endpoint: Endpoint,
    listener: Arc<Listener>,
    tls: TlsAcceptor,
    /// The server configuration without its crypto, which reloads replace.
    base: ServerConfig,
    sessions: Arc<dyn StoresServerSessions>,
    /// The ALPN identifiers offered.
    alpn: &'static [&'static [u8]],
    /// The guard between noq and the socket, told of each connection attempt.
    guard: Arc<Guarded>,
}

impl std::fmt::Debug for QuicListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicListener")
            .field("listener", &self.listener.url)
            .finish_non_exhaustive()
    }
}

impl QuicListener {
    /// Binds `listener`'s UDP address with the certificates of `tls` and the `[quic]` settings;
    /// the guard counts what it drops in `metrics`.
    pub(crate) fn bind(
        listener: &Listener,
        config: &Config,
        tls: &TlsAcceptor,
        metrics: &Metrics,
    ) -> io::Result<Self> {
        let size = match config.max_connections {
            0 => SESSION_CACHE,
            n => n,
        };
        let sessions = TlsAcceptor::session_cache(size);
        let alpn = alpn(config);
        let crypto = quic_crypto(tls, &sessions, alpn)?;
        let mut base = ServerConfig::with_crypto(crypto);
        base.transport_config(Arc::new(transport(config)?));
        let (udp, buffers) = socket::bind(
            listener.addr,
            config.quic.socket_recv_buffer,
            config.quic.socket_send_buffer,
        )?;
        metrics
            .quic_socket_recv_buffer_bytes
            .set(i64::try_from(buffers.recv).unwrap_or(i64::MAX));
        metrics
            .quic_socket_send_buffer_bytes
            .set(i64::try_from(buffers.send).unwrap_or(i64::MAX));
        info!(
            listener = %listener.url,
            recv_buffer = buffers.recv,
            send_buffer = buffers.send,
            "QUIC socket bound"
        );
        let lifetime = handshake_limit(config) + GUARD_GRACE;
        let guard = Arc::new(Guarded::new(
            Guard::new(VERSIONS, lifetime, GUARD_CAPACITY),
            VERSIONS,
            metrics,
        ));
        let runtime = Arc::new(TokioRuntime);
        let udp = Box::new(GuardedSocket::new(
            runtime.wrap_udp_socket(udp)?,
            guard.clone(),
        ));
        let mut endpoint_config = EndpointConfig::default();
        endpoint_config.supported_versions(VERSIONS.to_vec());
        let endpoint =
            Endpoint::new_with_abstract_socket(endpoint_config, Some(base.clone()), udp, runtime)?;
        Ok(Self {
            endpoint,
            listener: Arc::new(listener.clone()),
            tls: tls.clone(),
            base,
            sessions,
            alpn,
            guard,
        })
    }

    /// The UDP address bound.
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Accepts connections until shutdown, then lets the endpoint send its connections'
    /// closes.
    pub(crate) async fn run(self, inner: Arc<Inner>, admission: Arc<Admission>, name: Arc<str>) {
        let handshakes = Arc::new(AtomicUsize::new(0));
        let mut reloads = self.tls.reloads();
        let retry_above = inner.config.quic.retry_above_handshakes;
        loop {
            let incoming = tokio::select! {
                _ = inner.shutdown.cancelled() => break,
                Ok(()) = reloads.changed() => {
                    self.reload(&name);
                    continue;
                }
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
            };
            let addr = incoming.remote_address();
            let validated = incoming.remote_address_validated();
            if !validated
                && incoming.may_retry()
                && handshakes.load(Ordering::Relaxed) >= retry_above
            {
                if incoming.retry().is_ok() {
                    inner.metrics.quic_retries.inc();
                }
                // A Retry leaves noq no state: nothing more goes to the address for it.
                self.guard.forget(addr);
                continue;
            }
            // Before noq answers: from here on, what it sends an unvalidated address is
            // limited.
            if !self.guard.attempt(addr, validated) {
                incoming.ignore();
                continue;
            }
            let Some(permit) = admit(&inner, &admission, addr, true) else {
                incoming.refuse();
                self.guard.forget(addr);
                continue;
            };
            let accepted = now();
            let connecting = match incoming.accept() {
                Ok(connecting) => connecting,
                Err(error) => {
                    debug!(peer = %addr, %error, "QUIC connection attempt failed");
                    self.guard.forget(addr);
                    continue;
                }
            };
            let handshake = Handshake {
                inner: inner.clone(),
                tls: self.tls.clone(),
                name: name.clone(),
                addr,
                accepted,
                count: InProgress::new(&handshakes),
            };
            inner.tasks.spawn(async move {
                handshake.open(connecting).await;
                drop(permit);
            });
        }
        self.endpoint.set_server_config(None);
        let _ = tokio::time::timeout(DRAIN, self.endpoint.wait_idle()).await;
    }

    /// New certificates (SIGHUP): new connections get them.
    fn reload(&self, name: &str) {
        match quic_crypto(&self.tls, &self.sessions, self.alpn) {
            Ok(crypto) => {
                let mut config = self.base.clone();
                config.crypto = crypto;
                self.endpoint.set_server_config(Some(config));
                info!(listener = %name, "QUIC certificates reloaded");
            }
            Err(error) => warn!(listener = %name, %error, "QUIC certificates not reloaded"),
        }
    }
}

/// How long a handshake may take: `connect_timeout`, or `quic.handshake_idle_timeout` if
/// shorter.
fn handshake_limit(config: &Config) -> Duration {
    let mut limit = Duration::from_secs(config.connect_timeout.max(1));
    if config.quic.handshake_idle_timeout > 0 {
        limit = limit.min(Duration::from_secs(config.quic.handshake_idle_timeout));
    }
    limit
}

/// The rustls configuration of the endpoint, from the files as they are now.
fn quic_crypto(
    tls: &TlsAcceptor,
    sessions: &Arc<dyn StoresServerSessions>,
    alpn: &[&[u8]],
) -> io::Result<Arc<QuicServerConfig>> {
    let rustls = tls
        .quic_server_config(alpn, sessions.clone())
        .map_err(io::Error::other)?;
    let crypto = QuicServerConfig::try_from(rustls).map_err(io::Error::other)?;
    Ok(Arc::new(crypto))
}

/// The transport settings of `[quic]`.
fn transport(config: &Config) -> io::Result<TransportConfig> {
    let quic = &config.quic;
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(quic.peer_bidi_stream_count));
    // MQTT clients open none; HTTP/3 clients need three and check the transport parameters
    // for them before they know the ALPN. An MQTT connection gets no more (`refuse_uni`).
    let uni = if quic.http3 {
        crate::http3::MIN_UNI_STREAMS
    } else {
        0
    };
    t.max_concurrent_uni_streams(VarInt::from_u32(uni));
    let idle = match quic.idle_timeout {
        // The MQTT keep alive decides when an idle client is gone: QUIC must not cut a client
        // that keeps to it (the broker allows 1.5 times the keep alive).
        0 => {
            match u64::from(config.max_keepalive) {
                0 => LONGEST_KEEP_ALIVE,
                k => k,
            }
            .saturating_mul(3)
                / 2
        }
        secs => secs,
    };
    let idle = IdleTimeout::try_from(Duration::from_secs(idle))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "quic.idle_timeout too long"))?;
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(
        (quic.keep_alive_interval > 0).then(|| Duration::from_secs(quic.keep_alive_interval)),
    );
    t.initial_rtt(Duration::from_millis(quic.initial_rtt_ms.max(1)));
    t.stream_receive_window(VarInt::from_u32(quic.stream_recv_window_default));
    t.receive_window(VarInt::from_u32(quic.conn_flow_control_window));
    // What the broker buffers unacknowledged per connection: bounded like what it receives.
    t.send_window(u64::from(quic.conn_flow_control_window));
    // MQTT uses no datagrams.
    t.datagram_receive_buffer_size(None);
    match quic.congestion_control {
        CongestionControl::Cubic => {
            t.congestion_controller_factory(Arc::new(CubicConfig::default()))
        }
        CongestionControl::NewReno => {
            t.congestion_controller_factory(Arc::new(NewRenoConfig::default()))
        }
    };
    Ok(t)
}

/// The ALPN the client chose, once its ClientHello was read.
fn alpn_of(
    data: Result<Result<Box<dyn std::any::Any>, noq::ConnectionError>, tokio::time::error::Elapsed>,
) -> Result<Option<Vec<u8>>, String> {
    match data {
        Ok(Ok(data)) => Ok(data
            .downcast::<HandshakeData>()
            .ok()
            .and_then(|d| d.protocol)),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("not done within connect_timeout".to_owned()),
    }
}

/// Closes `conn` unless its handshake completes by `deadline`; either way then stops counting
/// it among the handshakes in progress.
async fn watch_handshake(
    inner: Arc<Inner>,
    addr: SocketAddr,
    conn: Connection,
    deadline: Instant,
    count: InProgress,
) {
    let done = tokio::time::timeout_at(deadline.into(), conn.authenticated()).await;
    drop(count);
    match done {
        Ok(Ok(())) => {}
        Ok(Err(error)) => debug!(peer = %addr, %error, "QUIC connection ended in its handshake"),
        Err(_) => {
            inner.metrics.quic_handshake_failures.inc();
            info!(peer = %addr, "QUIC handshake not done within connect_timeout");
            let code = mqttd_proto::ReasonCode::MaximumConnectTime.as_u8();
            conn.close(VarInt::from(code), b"handshake not done in time");
        }
    }
}

/// Stops each unidirectional stream an MQTT client opens (it may, when the endpoint allows them
/// for HTTP/3), so that none holds a receive window of data nobody reads; and lowers the limit
/// to none. Never returns.
async fn refuse_uni(conn: Connection) {
    conn.set_max_concurrent_uni_streams(VarInt::from_u32(0));
    while let Ok(mut stream) = conn.accept_uni().await {
        let _ = stream.stop(VarInt::from_u32(NO_UNI_STREAMS));
    }
    std::future::pending::<()>().await;
}

/// Counts a handshake in progress while it lives.
struct InProgress(Arc<AtomicUsize>);

impl InProgress {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection attempt the accept loop admitted, in its own task.
struct Handshake {
    inner: Arc<Inner>,
    tls: TlsAcceptor,
    name: Arc<str>,
    addr: SocketAddr,
    /// When the first packet came: the handshake, the first stream and CONNECT must all be
    /// done within `connect_timeout` of it.
    accepted: Instant,
    /// Counted among the handshakes in progress until the handshake completes.
    count: InProgress,
}

impl Handshake {
    /// The deadline of the handshake.
    fn deadline(&self) -> Instant {
        self.accepted + handshake_limit(&self.inner.config)
    }

    /// Runs the handshake as far as MQTT needs, then MQTT until the connection ends.
    async fn open(self, mut connecting: Connecting) {
        let deadline = self.deadline();
        let data = tokio::select! {
            data = tokio::time::timeout_at(deadline.into(), connecting.handshake_data()) => data,
            _ = self.inner.shutdown.cancelled() => return,
        };
        // Taken out of the `dyn Any` (which is not `Send`) before anything else is awaited.
        let alpn = match alpn_of(data) {
            Ok(alpn) => alpn,
            Err(error) => return self.failed(&error),
        };
        match alpn.as_deref() {
            Some(ALPN_MQTT) => {}
            // Offered only with `quic.http3`.
            Some(ALPN_H3) => return self.http3(connecting, deadline).await,
            _ => return self.refuse(connecting, "no MQTT ALPN"),
        }
        let (conn, identity) = if self.tls.verifies_clients() {
            // The client's certificate is verified only when the handshake ends: wait for it.
            let done = tokio::select! {
                done = tokio::time::timeout_at(deadline.into(), connecting) => done,
                _ = self.inner.shutdown.cancelled() => return,
            };
            let conn = match done {
                Ok(Ok(conn)) => conn,
                Ok(Err(error)) => return self.failed(&error),
                Err(_) => return self.failed(&"not done within connect_timeout"),
            };
            (conn.clone(), self.identity(&conn))
        } else {
            match connecting.into_0rtt() {
                Ok((conn, _)) => (conn, None),
                // Not on a server, where 0.5-RTT is always possible.
                Err(connecting) => match connecting.await {
                    Ok(conn) => (conn, None),
                    Err(error) => return self.failed(&error),
                },
            }
        };
        self.inner.metrics.quic_handshakes.inc();
        debug!(peer = %self.addr, listener = %self.name, zero_rtt = !self.tls.verifies_clients(), "QUIC connection open");
        let mut peer = Peer::new(Transport::Quic, self.addr, self.name.clone());
        peer.tls_identity = identity;
        let serve =
            crate::drivers::quic::serve(self.inner.clone(), conn.clone(), peer, self.accepted);
        let refuse = refuse_uni(conn.clone());
        let watchdog = watch_handshake(self.inner, self.addr, conn, deadline, self.count);
        // Served from 0-RTT on, the handshake still has to end in time: the watchdog closes
        // the connection otherwise, which the driver sees as the connection lost.
        tokio::join!(
            async {
                // `refuse` never ends: the connection's life is the driver's.
                tokio::select! {
                    () = serve => {}
                    () = refuse => {}
                }
            },
            watchdog
        );
    }

    /// Completes the handshake of a connection that chose HTTP/3, by the deadline, and serves
    /// it. No 0-RTT: a probe gains nothing from it.
    async fn http3(self, connecting: Connecting, deadline: Instant) {
        let done = tokio::select! {
            done = tokio::time::timeout_at(deadline.into(), connecting) => done,
            _ = self.inner.shutdown.cancelled() => return,
        };
        let conn = match done {
            Ok(Ok(conn)) => conn,
            Ok(Err(error)) => return self.failed(&error),
            Err(_) => return self.failed(&"not done within connect_timeout"),
        };
        drop(self.count);
        debug!(peer = %self.addr, listener = %self.name, "HTTP/3 connection open");
        crate::http3::serve(conn, self.inner).await;
    }

    /// The identity in the client's verified certificate.
    fn identity(&self, conn: &Connection) -> Option<Arc<str>> {
        let chain = conn.peer_identity()?;
        let chain = chain.downcast::<Vec<CertificateDer<'static>>>().ok()?;
        self.tls.identity_of(&chain)
    }

    /// Counts and logs a failed handshake.
    fn failed(&self, error: &dyn std::fmt::Display) {
        self.inner.metrics.quic_handshake_failures.inc();
        info!(peer = %self.addr, listener = %self.name, %error, "QUIC handshake failed");
    }

    /// Closes a connection whose ALPN the broker does not serve.
    fn refuse(&self, connecting: Connecting, why: &'static str) {
        self.failed(&why);
        if let Ok((conn, _)) = connecting.into_0rtt() {
            conn.close(VarInt::from_u32(WRONG_PROTOCOL), why.as_bytes());
        }
    }
}
