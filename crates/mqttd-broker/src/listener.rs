//! Accepting connections: binding each listener by its kind, connection limits, per-address
//! rate limits, TCP_NODELAY.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::broker::Inner;
use crate::config::{Listener, ListenerKind};
use crate::hooks::{Peer, Transport};
use crate::http;

/// A listener bound to its address: each kind binds the socket its protocol needs (a TCP
/// listener for MQTT over TCP and for HTTP; a UDP socket for QUIC, when it comes), and then
/// runs its own accept loop.
#[derive(Debug)]
pub(crate) enum BoundListener {
    /// MQTT over TCP.
    Tcp(TcpListener),
    /// The HTTP endpoint.
    Http(TcpListener),
}

impl BoundListener {
    /// Binds `listener`'s address as its kind requires.
    pub(crate) async fn bind(listener: &Listener) -> io::Result<Self> {
        match listener.kind {
            ListenerKind::Tcp => TcpListener::bind(listener.addr).await.map(Self::Tcp),
            ListenerKind::Http => TcpListener::bind(listener.addr).await.map(Self::Http),
            ListenerKind::Tls | ListenerKind::Ws | ListenerKind::Wss => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this listener kind is not served yet",
            )),
        }
    }

    /// The address actually bound (the chosen port when the configuration said 0).
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Tcp(socket) | Self::Http(socket) => socket.local_addr(),
        }
    }

    /// Starts the listener's accept loop as a broker task, which ends at shutdown.
    pub(crate) fn spawn(self, inner: &Arc<Inner>, admission: &Arc<Admission>, name: Arc<str>) {
        match self {
            Self::Tcp(socket) => {
                inner
                    .tasks
                    .spawn(run_tcp(inner.clone(), admission.clone(), socket, name));
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

/// Accepts MQTT over TCP until shutdown.
async fn run_tcp(
    inner: Arc<Inner>,
    admission: Arc<Admission>,
    listener: TcpListener,
    name: Arc<str>,
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
        let peer = Peer {
            transport: Transport::Tcp,
            addr,
            listener: name.clone(),
        };
        let inner2 = inner.clone();
        inner.tasks.spawn(async move {
            crate::drivers::stream::serve(inner2, stream, peer).await;
            drop(permit);
        });
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
