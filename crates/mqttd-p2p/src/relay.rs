//! The relay and bootstrap role: iroh-relay's server, run by a node that peers can reach
//! when they cannot reach each other. It forwards encrypted packets between the nodes
//! connected to it (by node id only: it cannot read them), and tells each node the address
//! it sees the node's packets come from (QUIC address discovery), which is how nodes behind
//! NAT learn the addresses to punch holes with.
//!
//! One port number serves both: HTTPS on TCP (the relay protocol, over a WebSocket) and QUIC
//! address discovery on UDP, so that a relay's URL, `https://HOST:PORT`, says everything a
//! node needs ([`RelayUrl::quic_port`]). iroh-relay also needs a plain-HTTP listener for its
//! captive-portal probe; mqttd puts it on loopback, where it bothers no one (nodes do not
//! probe it: [`crate::Node::bind`] turns the check off).
//!
//! Admission ([`Gate`], the server's `AccessControl`): a node must be on the allow-list (or
//! the relay admits any node, if so configured), and the relay serves at most `max_clients`
//! connections at once. The relay proves each node's id in its handshake before asking.
//! Each client's sending rate is capped by iroh-relay's own per-client rate limit.
//!
//! QUIC address discovery is served here ([`AddressDiscovery`]) rather than by iroh-relay's
//! own server, which answers a client's first Initial with the whole TLS handshake, up to
//! QUIC's 3x amplification allowance, to whatever source address the Initial claims. Ours
//! first answers with a Retry, smaller than the Initial, and shakes hands only with an address
//! that echoed the Retry's token, so a forged source address gets less than was sent.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use iroh_relay::quic::{
    ALPN_QUIC_ADDR_DISC, QUIC_ADDR_DISC_CLOSE_CODE, QUIC_ADDR_DISC_CLOSE_REASON,
};
use iroh_relay::server::{self as relay, Access, AccessControl, ClientRequest};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::addr::{ParseRelayUrlError, RelayUrl};
use crate::key::NodeId;

/// Which nodes may use the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayAccess {
    /// Any node.
    Any,
    /// Only these nodes.
    Allow(HashSet<NodeId>),
}

/// A per-client limit on the bytes a client may send through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientRate {
    /// Sustained bytes per second.
    pub bytes_per_second: NonZeroU32,
    /// Bytes a client may send at once above the sustained rate; `None` for iroh-relay's
    /// default burst.
    pub burst_bytes: Option<NonZeroU32>,
}

impl ClientRate {
    /// A limit of `bytes_per_second` with the default burst.
    pub fn new(bytes_per_second: NonZeroU32) -> Self {
        Self {
            bytes_per_second,
            burst_bytes: None,
        }
    }
}

/// How a relay server runs. Settings will be added: start from [`RelayServerConfig::new`]
/// and assign the fields to change.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayServerConfig {
    /// Address for HTTPS (TCP) and QUIC address discovery (UDP), on the same port number;
    /// port 0 picks a port free for both.
    pub bind: SocketAddr,
    /// The TLS configuration (certificate) for HTTPS and QUIC; it must allow TLS 1.3, which
    /// QUIC requires. Its ALPN list is replaced.
    pub tls: rustls::ServerConfig,
    /// Which nodes may use the relay: by default none, until nodes are allowed.
    pub access: RelayAccess,
    /// Connections served at once; 0 for no limit.
    pub max_clients: usize,
    /// Per-client sending limit; `None` for none.
    pub client_rate: Option<ClientRate>,
    /// Whether to serve QUIC address discovery.
    pub quic_discovery: bool,
    /// The plain-HTTP listener iroh-relay needs besides HTTPS (captive-portal probes only).
    pub http_bind: SocketAddr,
}

impl RelayServerConfig {
    /// Defaults for a relay on `bind` with the certificate in `tls`: no node allowed yet,
    /// at most 1,024 clients, no rate limit, QUIC address discovery on.
    pub fn new(bind: SocketAddr, tls: rustls::ServerConfig) -> Self {
        Self {
            bind,
            tls,
            access: RelayAccess::Allow(HashSet::new()),
            max_clients: 1024,
            client_rate: None,
            quic_discovery: true,
            http_bind: (Ipv4Addr::LOCALHOST, 0).into(),
        }
    }
}

/// Why a relay server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayServerError {
    /// The address could not be bound.
    #[error("cannot bind the relay on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The server failed to start (a TLS configuration without TLS 1.3 is refused here).
    #[error("cannot start the relay: {source}")]
    Spawn {
        /// Why (iroh-relay's error).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Counts of a relay's admissions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Clients connected now.
    pub clients: usize,
    /// Connections refused so far because the node is not allowed.
    pub refused_not_allowed: u64,
    /// Connections refused so far because `max_clients` were connected.
    pub refused_full: u64,
    /// QUIC address discovery attempts answered with a Retry (their source address not yet
    /// validated).
    pub discovery_retries: u64,
    /// QUIC address discovery connections made (from validated addresses).
    pub discovery_connections: u64,
}

/// A running relay server; dropping it stops it at once, [`RelayServer::shutdown`] stops it
/// gracefully.
#[derive(Debug)]
pub struct RelayServer {
    server: relay::Server,
    https_addr: SocketAddr,
    gate: Arc<Gate>,
    discovery: Option<AddressDiscovery>,
}

impl RelayServer {
    /// Binds and starts the relay.
    pub async fn spawn(config: RelayServerConfig) -> Result<Self, RelayServerError> {
        let gate = Arc::new(Gate::new(config.access.clone(), config.max_clients));
        // With port 0 the free port found for both protocols may be taken before the server
        // binds it: try again with another.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let bind = match (config.bind.port(), config.quic_discovery) {
                (0, true) => {
                    let ip = config.bind.ip();
                    let port = free_port_for_both(ip).map_err(|source| RelayServerError::Bind {
                        addr: config.bind,
                        source,
                    })?;
                    SocketAddr::new(ip, port)
                }
                _ => config.bind,
            };
            let discovery = match config.quic_discovery {
                true => match AddressDiscovery::spawn(bind, config.tls.clone(), gate.clone()) {
                    Ok(discovery) => Some(discovery),
                    Err(e @ RelayServerError::Bind { .. })
                        if config.bind.port() == 0 && attempts < 5 =>
                    {
                        debug!(error = %e, "relay port taken meanwhile; trying another");
                        continue;
                    }
                    Err(e) => return Err(e),
                },
                false => None,
            };
            match relay::Server::spawn(server_config(&config, bind, &gate)).await {
                Ok(server) => {
                    let https_addr = server.https_addr().unwrap_or(bind);
                    let quic = discovery.as_ref().map(|d| d.addr);
                    debug!(%https_addr, ?quic, "relay started");
                    return Ok(Self {
                        server,
                        https_addr,
                        gate,
                        discovery,
                    });
                }
                Err(e) if config.bind.port() == 0 && attempts < 5 && is_bind_error(&e) => {
                    debug!(error = %e, "relay port taken meanwhile; trying another");
                }
                Err(e) => {
                    return Err(RelayServerError::Spawn {
                        source: Box::new(e),
                    })
                }
            }
        }
    }

    /// The address HTTPS is served on (and QUIC address discovery, on UDP).
    pub fn local_addr(&self) -> SocketAddr {
        self.https_addr
    }

    /// The address QUIC address discovery is served on, if it is.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.discovery.as_ref().map(|d| d.addr)
    }

    /// The relay's URL with its bound address (loopback for an unspecified address: use
    /// [`RelayServer::url_for_host`] with the name peers know the host by).
    pub fn url(&self) -> RelayUrl {
        let ip = match self.https_addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let url = format!("https://{}", SocketAddr::new(ip, self.https_addr.port()));
        // An IP address and a port always make a valid https URL.
        #[allow(clippy::expect_used)]
        url.parse().expect("https://IP:PORT is a valid relay URL")
    }

    /// The relay's URL with `host` (a DNS name or an IP address) and the bound port.
    pub fn url_for_host(&self, host: &str) -> Result<RelayUrl, ParseRelayUrlError> {
        let host = match host.parse::<std::net::Ipv6Addr>() {
            Ok(v6) => format!("[{v6}]"),
            Err(_) => host.to_owned(),
        };
        format!("https://{host}:{}", self.https_addr.port()).parse()
    }

    /// Replaces the access rule for new connections (clients connected stay).
    pub fn set_access(&self, access: RelayAccess) {
        self.gate.set_access(access);
    }

    /// Admission counts.
    pub fn stats(&self) -> RelayStats {
        self.gate.stats()
    }

    /// Stops accepting, closes the clients' connections and waits for the server's tasks.
    pub async fn shutdown(mut self) {
        if let Some(discovery) = self.discovery.take() {
            discovery.shutdown().await;
        }
        if let Err(e) = self.server.shutdown().await {
            warn!(error = %e, "relay server stopped with an error");
        }
    }
}

fn server_config(
    config: &RelayServerConfig,
    bind: SocketAddr,
    gate: &Arc<Gate>,
) -> relay::ServerConfig {
    let tls = relay::TlsConfig::new(
        bind,
        relay::CertConfig::Manual {
            server_config: config.tls.clone(),
        },
    );
    let mut limits = relay::Limits::default();
    limits.client_rx = config.client_rate.map(|rate| {
        let mut limit = relay::ClientRateLimit::new(rate.bytes_per_second);
        limit.max_burst_bytes = rate.burst_bytes;
        limit
    });
    let mut relay_config = relay::RelayConfig::new(config.http_bind);
    relay_config.tls = Some(tls);
    relay_config.limits = limits;
    relay_config.access = gate.clone();
    let mut server = relay::ServerConfig::default();
    server.relay = Some(relay_config);
    // Address discovery is ours (`AddressDiscovery`), not iroh-relay's.
    server.quic = None;
    server
}

/// The QUIC address discovery server: a QUIC endpoint for iroh's ALPN that reports to each
/// client the address it sees it at, and carries nothing else (no streams). Every new client
/// first gets a Retry: no handshake, and so no more bytes than it sent, goes to an address
/// that has not proved it receives what is sent to it.
#[derive(Debug)]
struct AddressDiscovery {
    endpoint: noq::Endpoint,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl AddressDiscovery {
    fn spawn(
        bind: SocketAddr,
        mut tls: rustls::ServerConfig,
        gate: Arc<Gate>,
    ) -> Result<Self, RelayServerError> {
        tls.alpn_protocols = vec![ALPN_QUIC_ADDR_DISC.to_vec()];
        let crypto = noq::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| {
            RelayServerError::Spawn {
                source: Box::new(e),
            }
        })?;
        let mut config = noq::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = noq::TransportConfig::default();
        transport
            .max_concurrent_uni_streams(0u8.into())
            .max_concurrent_bidi_streams(0u8.into())
            .send_observed_address_reports(true);
        config.transport_config(Arc::new(transport));
        let endpoint = noq::Endpoint::server(config, bind)
            .map_err(|source| RelayServerError::Bind { addr: bind, source })?;
        let addr = endpoint
            .local_addr()
            .map_err(|source| RelayServerError::Bind { addr: bind, source })?;
        let task = tokio::spawn(serve_discovery(endpoint.clone(), gate));
        Ok(Self {
            endpoint,
            addr,
            task,
        })
    }

    /// Closes the clients' connections and waits (briefly) for that to be sent.
    async fn shutdown(self) {
        self.endpoint
            .close(QUIC_ADDR_DISC_CLOSE_CODE, QUIC_ADDR_DISC_CLOSE_REASON);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.endpoint.wait_idle())
            .await;
        self.task.abort();
    }
}

impl Drop for AddressDiscovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers address discovery attempts until the endpoint closes.
async fn serve_discovery(endpoint: noq::Endpoint, gate: Arc<Gate>) {
    let mut conns = tokio::task::JoinSet::new();
    while let Some(incoming) = endpoint.accept().await {
        while conns.try_join_next().is_some() {}
        if !incoming.remote_address_validated() {
            if incoming.may_retry() {
                gate.discovery_retries.fetch_add(1, Ordering::Relaxed);
                // A Retry is smaller than the Initial that asked for it (at least 1,200
                // bytes): the only answer an unvalidated address gets.
                let _ = incoming.retry();
            } else {
                // A second Retry would not validate it either.
                incoming.ignore();
            }
            continue;
        }
        gate.discovery_connections.fetch_add(1, Ordering::Relaxed);
        conns.spawn(async move {
            // The report is sent by QUIC itself; the client closes when it has it.
            if let Ok(conn) = incoming.await {
                conn.closed().await;
            }
        });
    }
}

/// Whether the server failed because a socket could not be bound (the port was taken).
fn is_bind_error(e: &relay::SpawnError) -> bool {
    matches!(
        e,
        relay::SpawnError::BindTcpListener { .. }
            | relay::SpawnError::BindTlsListener { .. }
            | relay::SpawnError::QuicSpawn { .. }
    )
}

/// A port number free on `ip` for both TCP and UDP.
fn free_port_for_both(ip: IpAddr) -> io::Result<u16> {
    for _ in 0..32 {
        let tcp = TcpListener::bind((ip, 0))?;
        let port = tcp.local_addr()?.port();
        if UdpSocket::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no port free for both TCP and UDP",
    ))
}

/// The relay's admission: the allow-list and the client cap. iroh-relay asks it once per
/// connection, after the node proved its id, and tells it when an admitted one ends.
#[derive(Debug)]
pub(crate) struct Gate {
    access: RwLock<RelayAccess>,
    max_clients: usize,
    clients: AtomicUsize,
    refused_not_allowed: AtomicU64,
    refused_full: AtomicU64,
    discovery_retries: AtomicU64,
    discovery_connections: AtomicU64,
}

/// Why the gate refused a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    NotAllowed,
    Full,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Self::NotAllowed => "node not allowed on this relay",
            Self::Full => "relay full",
        }
    }
}

impl Gate {
    pub(crate) fn new(access: RelayAccess, max_clients: usize) -> Self {
        Self {
            access: RwLock::new(access),
            max_clients,
            clients: AtomicUsize::new(0),
            refused_not_allowed: AtomicU64::new(0),
            refused_full: AtomicU64::new(0),
            discovery_retries: AtomicU64::new(0),
            discovery_connections: AtomicU64::new(0),
        }
    }

    fn set_access(&self, access: RelayAccess) {
        *self.access.write().unwrap_or_else(|e| e.into_inner()) = access;
    }

    /// Admits `id` and counts it as a client, or says why not.
    pub(crate) fn admit(&self, id: &NodeId) -> Result<(), Refusal> {
        let allowed = match &*self.access.read().unwrap_or_else(|e| e.into_inner()) {
            RelayAccess::Any => true,
            RelayAccess::Allow(ids) => ids.contains(id),
        };
        if !allowed {
            self.refused_not_allowed.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::NotAllowed);
        }
        let max = match self.max_clients {
            0 => usize::MAX,
            n => n,
        };
        // Count and check in one step, so that racing admissions cannot pass the cap.
        self.clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map(drop)
            .map_err(|_| {
                self.refused_full.fetch_add(1, Ordering::Relaxed);
                Refusal::Full
            })
    }

    /// An admitted client is gone.
    pub(crate) fn release(&self) {
        let _ = self
            .clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    pub(crate) fn stats(&self) -> RelayStats {
        RelayStats {
            clients: self.clients.load(Ordering::Acquire),
            refused_not_allowed: self.refused_not_allowed.load(Ordering::Relaxed),
            refused_full: self.refused_full.load(Ordering::Relaxed),
            discovery_retries: self.discovery_retries.load(Ordering::Relaxed),
            discovery_connections: self.discovery_connections.load(Ordering::Relaxed),
        }
    }
}

impl AccessControl for Gate {
    async fn on_connect(&self, request: &ClientRequest) -> Access {
        let id = NodeId(request.endpoint_id());
        match self.admit(&id) {
            Ok(()) => {
                debug!(node_id = %id, "relay client admitted");
                Access::Allow
            }
            Err(refusal) => {
                // Debug, not info: anyone can knock, and each knock would be a line.
                debug!(node_id = %id, reason = refusal.reason(), "relay client refused");
                Access::Deny {
                    reason: Some(refusal.reason().to_owned()),
                }
            }
        }
    }

    fn on_disconnect(&self, _endpoint_id: iroh::EndpointId, _connection_id: relay::ConnectionId) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeKey;

    #[test]
    fn the_gate_admits_allowed_nodes_up_to_the_cap() {
        let (a, b, c) = (
            NodeKey::generate().id(),
            NodeKey::generate().id(),
            NodeKey::generate().id(),
        );
        let gate = Gate::new(RelayAccess::Allow([a, b].into_iter().collect()), 1);
        assert_eq!(gate.admit(&c), Err(Refusal::NotAllowed));
        assert_eq!(gate.admit(&a), Ok(()));
        assert_eq!(gate.admit(&b), Err(Refusal::Full));
        gate.release();
        assert_eq!(gate.admit(&b), Ok(()));
        assert_eq!(
            gate.stats(),
            RelayStats {
                clients: 1,
                refused_not_allowed: 1,
                refused_full: 1,
                ..RelayStats::default()
            }
        );
        gate.set_access(RelayAccess::Any);
        gate.release();
        assert_eq!(gate.admit(&c), Ok(()));
    }

    #[test]
    fn no_cap_and_releases_never_go_below_zero() {
        let gate = Gate::new(RelayAccess::Any, 0);
        for _ in 0..1_000 {
            gate.admit(&NodeKey::generate().id()).unwrap();
        }
        assert_eq!(gate.stats().clients, 1_000);
        for _ in 0..1_001 {
            gate.release();
        }
        assert_eq!(gate.stats().clients, 0);
    }
}
