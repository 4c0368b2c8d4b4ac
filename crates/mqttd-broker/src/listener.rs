//! Accepting connections: binding each listener by its kind, connection limits, per-address
//! rate limits, TCP_NODELAY, and what a connection goes through before MQTT (a PROXY header, a
//! TLS handshake, a WebSocket upgrade), in the connection's own task under its CONNECT
//! deadline. QUIC listeners have their endpoint and accept loop in [`quic`]; relay listeners
//! (feature `p2p`) are mqttd-p2p's relay server, in `relay`; peer-to-peer listeners (feature
//! `p2p`) are a mqttd-p2p node, in `p2p`.

#[cfg(feature = "p2p")]
pub(crate) mod p2p;
pub(crate) mod quic;
#[cfg(feature = "p2p")]
mod relay;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::broker::Inner;
use crate::config::{Config, Listener, ListenerKind};
use crate::drivers::now;
use crate::drivers::park::ParkingLot;
use crate::drivers::stream::{serve_since, serve_tcp};
use crate::hooks::{Peer, Transport};
use crate::http;
use crate::metrics::Metrics;
use crate::tls::{TlsAcceptor, TlsStream};
use crate::transport::prefixed::Prefixed;
use crate::transport::{accept_websocket, read_proxy_header, ProxiedAddr};

/// A listener bound to its address: each kind binds the socket its protocol needs (a TCP
/// listener for MQTT over TCP or WebSocket and for HTTP; a QUIC endpoint on a UDP socket), and
/// then runs its own accept loop.
#[derive(Debug)]
pub(crate) enum BoundListener {
    /// MQTT over TCP, TLS, WebSocket or WebSocket over TLS: the listener's kind and options
    /// say which; TLS-based kinds carry the broker's TLS acceptor.
    Tcp(TcpListener, Arc<Listener>, Option<TlsAcceptor>),
    /// The HTTP endpoint.
    Http(TcpListener),
    /// MQTT over QUIC.
    Quic(Box<quic::QuicListener>),
    /// The peer-to-peer relay.
    #[cfg(feature = "p2p")]
    Relay(Box<relay::RelayListener>),
    /// MQTT over peer-to-peer node connections.
    #[cfg(feature = "p2p")]
    P2p(Box<p2p::P2pListener>),
}

impl BoundListener {
    /// Binds `listener`'s address as its kind requires. A `p2p://` listener uses the relay
    /// listener bound at `own_relay` unless `p2p.relays` names others.
    pub(crate) async fn bind(
        listener: &Listener,
        config: &Config,
        tls: Option<&TlsAcceptor>,
        metrics: &Metrics,
        own_relay: Option<SocketAddr>,
    ) -> io::Result<Self> {
        let acceptor = match listener.kind.uses_tls() {
            true => Some(tls.cloned().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "no TLS certificates loaded")
            })?),
            false => None,
        };
        match (listener.kind, acceptor) {
            (ListenerKind::Http, _) => TcpListener::bind(listener.addr).await.map(Self::Http),
            (ListenerKind::Quic, Some(tls)) => {
                quic::QuicListener::bind(listener, config, &tls, metrics)
                    .map(|q| Self::Quic(Box::new(q)))
            }
            #[cfg(feature = "p2p")]
            (ListenerKind::Relay, Some(tls)) => relay::RelayListener::bind(listener, config, &tls)
                .await
                .map(|r| Self::Relay(Box::new(r))),
            #[cfg(not(feature = "p2p"))]
            (ListenerKind::Relay, _) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "relay:// needs mqttd-broker's p2p feature",
            )),
            #[cfg(feature = "p2p")]
            (ListenerKind::P2p, _) => p2p::P2pListener::bind(listener, config, own_relay)
                .await
                .map(|p| Self::P2p(Box::new(p))),
            #[cfg(not(feature = "p2p"))]
            (ListenerKind::P2p, _) => {
                let _ = own_relay;
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "p2p:// needs mqttd-broker's p2p feature",
                ))
            }
            (_, acceptor) => {
                let socket = TcpListener::bind(listener.addr).await?;
                Ok(Self::Tcp(socket, Arc::new(listener.clone()), acceptor))
            }
        }
    }

    /// The address actually bound (the chosen port when the configuration said 0).
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Tcp(socket, ..) | Self::Http(socket) => socket.local_addr(),
            Self::Quic(quic) => quic.local_addr(),
            #[cfg(feature = "p2p")]
            Self::Relay(relay) => Ok(relay.local_addr()),
            #[cfg(feature = "p2p")]
            Self::P2p(p2p) => Ok(p2p.local_addr()),
        }
    }

    /// The node of a `p2p://` listener.
    #[cfg(feature = "p2p")]
    pub(crate) fn node(&self) -> Option<mqttd_p2p::Node> {
        match self {
            Self::P2p(p2p) => Some(p2p.node().clone()),
            _ => None,
        }
    }

    /// The allow-list of a `p2p://` listener's node.
    #[cfg(feature = "p2p")]
    pub(crate) fn p2p_allow(&self) -> Option<mqttd_p2p::AllowList> {
        match self {
            Self::P2p(p2p) => Some(p2p.allow().clone()),
            _ => None,
        }
    }

    /// Starts the listener's accept loop as a broker task, which ends at shutdown.
    pub(crate) fn spawn(self, inner: &Arc<Inner>, admission: &Arc<Admission>, name: Arc<str>) {
        match self {
            Self::Tcp(socket, listener, tls) => {
                inner.tasks.spawn(run_tcp(
                    inner.clone(),
                    admission.clone(),
                    socket,
                    listener,
                    name,
                    tls,
                ));
            }
            Self::Http(socket) => {
                inner.tasks.spawn(http::run(inner.clone(), socket));
            }
            Self::Quic(quic) => {
                inner
                    .tasks
                    .spawn(quic.run(inner.clone(), admission.clone(), name));
            }
            #[cfg(feature = "p2p")]
            Self::Relay(relay) => {
                inner.tasks.spawn(relay.run(inner.clone()));
            }
            #[cfg(feature = "p2p")]
            Self::P2p(p2p) => {
                inner
                    .tasks
                    .spawn(p2p.run(inner.clone(), admission.clone(), name));
            }
        }
    }
}

/// Counts new connections per source address in one-second windows.
#[derive(Debug, Default)]
pub(crate) struct RateLimiter {
    windows: DashMap<IpAddr, (Instant, u32)>,
}

impl RateLimiter {
    /// Whether one more connection from `ip` at `now` stays within `per_second`.
    pub(crate) fn allow(&self, ip: IpAddr, now: Instant, per_second: u32) -> bool {
        if per_second == 0 {
            return true;
        }
        if self.windows.len() > 100_000 {
            self.windows
                .retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(1));
        }
        let mut entry = self.windows.entry(ip).or_insert((now, 0));
        let (start, count) = entry.value_mut();
        if now.duration_since(*start) >= Duration::from_secs(1) {
            *start = now;
            *count = 0;
        }
        *count += 1;
        *count <= per_second
    }
}

/// Shared admission state of all listeners.
pub(crate) struct Admission {
    pub(crate) connections: Option<Arc<Semaphore>>,
    pub(crate) rate: RateLimiter,
}

impl Admission {
    pub(crate) fn new(max_connections: usize) -> Self {
        Self {
            connections: (max_connections > 0).then(|| Arc::new(Semaphore::new(max_connections))),
            rate: RateLimiter::default(),
        }
    }
}

/// Accepts connections for an MQTT listener on TCP (plain, TLS, WebSocket, WebSocket over
/// TLS) until shutdown.
async fn run_tcp(
    inner: Arc<Inner>,
    admission: Arc<Admission>,
    socket: TcpListener,
    listener: Arc<Listener>,
    name: Arc<str>,
    tls: Option<TlsAcceptor>,
) {
    // Behind a proxy, the socket's address is the proxy's: the rate limit waits for the
    // client's, which the connection's task learns.
    let proxied = listener.proxy_protocol || listener.trust_proxy;
    // Where this listener's plain TCP connections wait while idle, without a task.
    let plain = listener.kind == ListenerKind::Tcp && !listener.proxy_protocol;
    let lot = match plain.then(|| ParkingLot::new(inner.metrics.connections_parked.clone())) {
        Some(Ok(lot)) => {
            inner.tasks.spawn(lot.clone().run(inner.clone()));
            Some(lot)
        }
        Some(Err(error)) => {
            warn!(%error, "no parking lot: idle connections keep their tasks");
            None
        }
        None => None,
    };
    loop {
        let accepted = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            accepted = socket.accept() => accepted,
        };
        let (stream, addr) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(%error, listener = %name, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = admit(&inner, &admission, addr, !proxied) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let accepted = now();
        if let Some(lot) = &lot {
            // Nothing comes before MQTT: the task is the driver's alone, as small as it gets,
            // built outside the task's own future, and it parks while idle.
            let peer = Peer::new(Transport::Tcp, addr, name.clone());
            // The permit goes into the driver's future: an `async` block awaiting the
            // connection would hold its future twice (captured, and being awaited).
            let connection = serve_tcp(inner.clone(), lot.clone(), stream, peer, accepted, permit);
            inner.tasks.spawn(connection);
            continue;
        }
        let connection = Connection {
            inner: inner.clone(),
            admission: admission.clone(),
            listener: listener.clone(),
            name: name.clone(),
            addr,
            accepted,
            tls: tls.clone(),
            _permit: permit,
        };
        inner.tasks.spawn(connection.open(stream));
    }
}

/// A connection accepted on an MQTT listener where something comes before MQTT (a PROXY
/// header, a TLS handshake, a WebSocket upgrade).
struct Connection {
    inner: Arc<Inner>,
    admission: Arc<Admission>,
    listener: Arc<Listener>,
    name: Arc<str>,
    /// The socket's remote address.
    addr: SocketAddr,
    /// When it was accepted: what comes before MQTT counts against the CONNECT timeout.
    accepted: Instant,
    /// The TLS acceptor of a TLS-based listener.
    tls: Option<TlsAcceptor>,
    /// The connection's place under `max_connections`, held as long as the connection (in
    /// here rather than in an `async` block around [`Self::open`], which would hold the
    /// connection's future twice).
    _permit: Option<OwnedSemaphorePermit>,
}

impl Connection {
    /// Runs what the listener puts before MQTT (a WebSocket upgrade, a PROXY header), then
    /// MQTT. The handshake's future is boxed, so that the task does not keep its room while
    /// the connection lives.
    async fn open(self, stream: TcpStream) {
        // Each kind's steps run in a future of their own, boxed: the task holds only the one
        // its listener needs, not room for the largest (TLS and WebSocket state together).
        match self.listener.kind {
            ListenerKind::Ws => Box::pin(self.open_ws(stream)).await,
            ListenerKind::Wss => Box::pin(self.open_wss(stream)).await,
            ListenerKind::Tls => Box::pin(self.open_tls(stream)).await,
            _ => Box::pin(self.open_proxied(stream)).await,
        }
    }

    /// A PROXY header if the listener expects one, a WebSocket upgrade, then MQTT.
    async fn open_ws(self, stream: TcpStream) {
        if self.listener.proxy_protocol {
            let Some((stream, addr)) = self.proxy_header(stream).await else {
                return;
            };
            self.ws(stream, addr).await;
        } else {
            let addr = self.addr;
            self.ws(stream, addr).await;
        }
    }

    /// A PROXY header if the listener expects one, a TLS handshake, a WebSocket upgrade,
    /// then MQTT.
    async fn open_wss(self, stream: TcpStream) {
        if self.listener.proxy_protocol {
            let Some((stream, addr)) = self.proxy_header(stream).await else {
                return;
            };
            self.wss(stream, addr).await;
        } else {
            let addr = self.addr;
            self.wss(stream, addr).await;
        }
    }

    /// A WebSocket upgrade on `stream` from `addr` (the socket's or the PROXY header's), then
    /// MQTT.
    async fn ws<S>(self, stream: S, addr: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let upgrade = Box::pin(accept_websocket(stream, &self.listener));
        let Some((ws, upgraded)) = self.handshake("WebSocket upgrade", upgrade).await else {
            return;
        };
        let addr = self.forwarded(addr, upgraded.forwarded_for, upgraded.subprotocol);
        self.serve(ws, Transport::WebSocket, addr, None).await;
    }

    /// A TLS handshake and a WebSocket upgrade on `stream` from `addr`, then MQTT.
    async fn wss<S>(self, stream: S, addr: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Some((tls, identity)) = self.tls_handshake(stream).await else {
            return;
        };
        let upgrade = Box::pin(accept_websocket(tls, &self.listener));
        let Some((ws, upgraded)) = self.handshake("WebSocket upgrade", upgrade).await else {
            return;
        };
        let addr = self.forwarded(addr, upgraded.forwarded_for, upgraded.subprotocol);
        self.serve(ws, Transport::WebSocketTls, addr, identity)
            .await;
    }

    /// A PROXY header if the listener expects one, a TLS handshake, then MQTT.
    async fn open_tls(self, stream: TcpStream) {
        if self.listener.proxy_protocol {
            let Some((stream, addr)) = self.proxy_header(stream).await else {
                return;
            };
            let Some((tls, identity)) = self.tls_handshake(stream).await else {
                return;
            };
            self.serve(tls, Transport::Tls, addr, identity).await;
        } else {
            let Some((tls, identity)) = self.tls_handshake(stream).await else {
                return;
            };
            let addr = self.addr;
            self.serve(tls, Transport::Tls, addr, identity).await;
        }
    }

    /// A PROXY header, then MQTT over TCP.
    async fn open_proxied(self, stream: TcpStream) {
        let Some((stream, addr)) = self.proxy_header(stream).await else {
            return;
        };
        self.serve(stream, Transport::Tcp, addr, None).await;
    }

    /// The client's address after a WebSocket upgrade: `Forwarded`'s or `X-Forwarded-For`'s
    /// when the listener trusts them (see `accept_websocket`), else `addr` (the socket's or
    /// the PROXY header's).
    fn forwarded(
        &self,
        addr: SocketAddr,
        forwarded_for: Option<IpAddr>,
        subprotocol: Option<&str>,
    ) -> SocketAddr {
        let addr = match forwarded_for {
            // The headers' ports are dropped: X-Forwarded-For names none.
            Some(ip) => SocketAddr::new(ip, 0),
            None => addr,
        };
        debug!(
            peer = %self.addr,
            client = %addr,
            subprotocol = subprotocol.unwrap_or("none"),
            "WebSocket upgraded"
        );
        addr
    }

    /// Reads the PROXY header: the stream after it and the client's address.
    async fn proxy_header(&self, stream: TcpStream) -> Option<(Prefixed<TcpStream>, SocketAddr)> {
        let header = Box::pin(read_proxy_header(stream));
        let (stream, proxied) = self.handshake("PROXY header", header).await?;
        let addr = match proxied {
            ProxiedAddr::Client(addr) => addr,
            ProxiedAddr::Local => self.addr,
        };
        Some((stream, addr))
    }

    /// Runs the server side of a TLS handshake before the CONNECT deadline: the TLS stream
    /// and the client certificate's identity, or `None` (counted and logged) if it failed or
    /// did not end in time.
    async fn tls_handshake<S>(&self, stream: S) -> Option<(TlsStream<S>, Option<Arc<str>>)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = self.tls.as_ref()?;
        let deadline = self.accepted + self.inner.server_config.connect_timeout;
        let handshake = Box::pin(tokio::time::timeout_at(
            deadline.into(),
            acceptor.accept(stream),
        ));
        let accepted = tokio::select! {
            accepted = handshake => accepted,
            _ = self.inner.shutdown.cancelled() => return None,
        };
        match accepted {
            Ok(Ok(accepted)) => Some((accepted.stream, accepted.identity)),
            Ok(Err(error)) => {
                self.inner.metrics.tls_handshake_failures.inc();
                info!(peer = %self.addr, listener = %self.name, %error, "TLS handshake failed");
                None
            }
            Err(_) => {
                self.inner.metrics.tls_handshake_timeouts.inc();
                info!(peer = %self.addr, listener = %self.name, "TLS handshake not done within connect_timeout");
                None
            }
        }
    }

    /// Runs `step` until the CONNECT deadline or shutdown; `None` (the connection is to be
    /// dropped) if it failed or did not end in time.
    async fn handshake<T, E: std::fmt::Display>(
        &self,
        what: &'static str,
        step: impl Future<Output = Result<T, E>>,
    ) -> Option<T> {
        let deadline = self.accepted + self.inner.server_config.connect_timeout;
        tokio::select! {
            result = tokio::time::timeout_at(deadline.into(), step) => match result {
                Ok(Ok(done)) => Some(done),
                Ok(Err(error)) => {
                    debug!(peer = %self.addr, listener = %self.name, %error, "{what} failed");
                    None
                }
                Err(_) => {
                    debug!(peer = %self.addr, listener = %self.name, "{what} not done in time");
                    None
                }
            },
            _ = self.inner.shutdown.cancelled() => None,
        }
    }

    /// Serves MQTT on `stream` for the client at `addr`; first applies the rate limit that
    /// the accept loop left to the connection because it is proxied.
    async fn serve<S>(
        self,
        stream: S,
        transport: Transport,
        addr: SocketAddr,
        identity: Option<Arc<str>>,
    ) where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let proxied = self.listener.proxy_protocol || self.listener.trust_proxy;
        if proxied && !rate_allows(&self.inner, &self.admission, addr) {
            return;
        }
        let mut peer = Peer::new(transport, addr, self.name);
        peer.tls_identity = identity;
        serve_since(self.inner, stream, peer, self.accepted).await;
    }
}

/// Whether a new connection from `addr` stays within `max_connection_rate`; counts a refusal.
fn rate_allows(inner: &Inner, admission: &Admission, addr: SocketAddr) -> bool {
    let allowed = admission.rate.allow(
        addr.ip(),
        Instant::now(),
        inner.limits.load().max_connection_rate,
    );
    if !allowed {
        debug!(peer = %addr, "connection rate limit exceeded");
        inner.metrics.connections_refused.inc();
    }
    allowed
}

/// Admits a connection from `addr` within the connection limit and, if `check_rate`, the
/// per-address rate limit: its permit (if there is a limit), or `None` to drop it.
fn admit(
    inner: &Inner,
    admission: &Admission,
    addr: SocketAddr,
    check_rate: bool,
) -> Option<Option<OwnedSemaphorePermit>> {
    if check_rate && !rate_allows(inner, admission, addr) {
        return None;
    }
    let permit = match &admission.connections {
        Some(sem) => match sem.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                debug!(peer = %addr, "connection limit reached");
                inner.metrics.connections_refused.inc();
                return None;
            }
        },
        None => None,
    };
    inner.metrics.connections_accepted.inc();
    Some(permit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_per_address_and_window() {
        let r = RateLimiter::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        assert!(r.allow(ip, t0, 2));
        assert!(r.allow(ip, t0, 2));
        assert!(!r.allow(ip, t0, 2));
        assert!(r.allow(other, t0, 2));
        assert!(r.allow(ip, t0 + Duration::from_secs(1), 2));
    }
}
