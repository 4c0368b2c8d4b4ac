//! Accepting connections: binding each listener by its kind, connection limits, per-address
//! rate limits, TCP_NODELAY, and the TLS handshake under the connection's deadline.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::broker::Inner;
use crate::config::{Listener, ListenerKind};
use crate::hooks::{Peer, Transport};
use crate::http;
use crate::tls::TlsAcceptor;

/// A listener bound to its address: each kind binds the socket its protocol needs (a TCP
/// listener for MQTT over TCP and for HTTP; a UDP socket for QUIC, when it comes), and then
/// runs its own accept loop.
#[derive(Debug)]
pub(crate) enum BoundListener {
    /// MQTT over TCP.
    Tcp(TcpListener),
    /// MQTT over TLS over TCP.
    Tls(TcpListener, TlsAcceptor),
    /// The HTTP endpoint.
    Http(TcpListener),
}

impl BoundListener {
    /// Binds `listener`'s address as its kind requires; `tls` is the broker's TLS acceptor,
    /// which every TLS-based listener shares (there is one when such a listener is configured).
    pub(crate) async fn bind(listener: &Listener, tls: Option<&TlsAcceptor>) -> io::Result<Self> {
        match listener.kind {
            ListenerKind::Tcp => TcpListener::bind(listener.addr).await.map(Self::Tcp),
            ListenerKind::Tls => {
                let acceptor = tls.cloned().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "no TLS certificates loaded")
                })?;
                let socket = TcpListener::bind(listener.addr).await?;
                Ok(Self::Tls(socket, acceptor))
            }
            ListenerKind::Http => TcpListener::bind(listener.addr).await.map(Self::Http),
            ListenerKind::Ws | ListenerKind::Wss => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this listener kind is not served yet",
            )),
        }
    }

    /// The address actually bound (the chosen port when the configuration said 0).
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Tcp(socket) | Self::Tls(socket, _) | Self::Http(socket) => socket.local_addr(),
        }
    }

    /// Starts the listener's accept loop as a broker task, which ends at shutdown.
    pub(crate) fn spawn(self, inner: &Arc<Inner>, admission: &Arc<Admission>, name: Arc<str>) {
        match self {
            Self::Tcp(socket) => {
                inner.tasks.spawn(run_tcp(
                    inner.clone(),
                    admission.clone(),
                    socket,
                    name,
                    None,
                ));
            }
            Self::Tls(socket, acceptor) => {
                inner.tasks.spawn(run_tcp(
                    inner.clone(),
                    admission.clone(),
                    socket,
                    name,
                    Some(acceptor),
                ));
            }
            Self::Http(socket) => {
                inner.tasks.spawn(http::run(inner.clone(), socket));
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

/// Accepts MQTT over TCP, or over TLS with `tls`, until shutdown. The TLS handshake runs in
/// the connection's task, so a slow client holds up no one else.
async fn run_tcp(
    inner: Arc<Inner>,
    admission: Arc<Admission>,
    listener: TcpListener,
    name: Arc<str>,
    tls: Option<TlsAcceptor>,
) {
    loop {
        let accepted = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
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
        let Some(permit) = admit(&inner, &admission, addr) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let inner2 = inner.clone();
        match &tls {
            None => {
                let peer = Peer::new(Transport::Tcp, addr, name.clone());
                // Built outside the task's own future, which then holds only what it needs.
                let connection = crate::drivers::stream::serve(inner2, stream, peer);
                inner.tasks.spawn(async move {
                    connection.await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                let peer = Peer::new(Transport::Tls, addr, name.clone());
                let acceptor = acceptor.clone();
                inner.tasks.spawn(async move {
                    if let Some((stream, peer)) =
                        tls_handshake(&inner2, &acceptor, stream, peer).await
                    {
                        crate::drivers::stream::serve(inner2, stream, peer).await;
                    }
                    drop(permit);
                });
            }
        }
    }
}

/// Runs the server side of a TLS handshake within `connect_timeout`, and records the client
/// certificate's identity in `peer`. `None` if the handshake failed, the client was too slow,
/// or the broker is shutting down; the stream is then dropped (closed).
///
/// For WebSocket over TLS, the WebSocket handshake follows on the returned stream.
pub(crate) async fn tls_handshake<S>(
    inner: &Inner,
    acceptor: &TlsAcceptor,
    stream: S,
    mut peer: Peer,
) -> Option<(tokio_rustls::server::TlsStream<S>, Peer)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = Duration::from_secs(inner.config.connect_timeout.max(1));
    let accepted = tokio::select! {
        accepted = tokio::time::timeout(deadline, acceptor.accept(stream)) => accepted,
        _ = inner.shutdown.cancelled() => return None,
    };
    match accepted {
        Ok(Ok(accepted)) => {
            peer.tls_identity = accepted.identity;
            Some((accepted.stream, peer))
        }
        Ok(Err(error)) => {
            inner.metrics.tls_handshake_failures.inc();
            info!(peer = %peer.addr, listener = %peer.listener, %error, "TLS handshake failed");
            None
        }
        Err(_) => {
            inner.metrics.tls_handshake_timeouts.inc();
            info!(peer = %peer.addr, listener = %peer.listener, "TLS handshake not done within connect_timeout");
            None
        }
    }
}

fn admit(
    inner: &Inner,
    admission: &Admission,
    addr: SocketAddr,
) -> Option<Option<tokio::sync::OwnedSemaphorePermit>> {
    if !admission
        .rate
        .allow(addr.ip(), Instant::now(), inner.config.max_connection_rate)
    {
        debug!(peer = %addr, "connection rate limit exceeded");
        inner.metrics.connections_refused.inc();
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
