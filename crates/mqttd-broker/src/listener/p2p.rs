//! The `p2p://` listener: the broker's peer-to-peer node (mqttd-p2p, iroh underneath), with
//! the identity of `<data_dir>/node.key`, accepting connections from peers that dial its node
//! id, directly or through the relays of `[p2p]`.
//!
//! A connection for ALPN `mqtt` is MQTT over QUIC exactly as on `quic://`: the node's
//! connections are noq connections, and [`crate::drivers::quic`] serves them, single- or
//! multi-stream. A connection for [`PING_ALPN`] gets its pings answered (`mqttd p2p ping`),
//! at most [`mqttd_p2p::MAX_PINGS`] of them. The peer's node id, which the handshake proved, is the client's identity
//! ([`Peer::tls_identity`]), and its user name with `p2p.use_node_id_as_username`.
//!
//! Admission: the broker's connection limit applies to every attempt, the per-address rate
//! limit to those that come straight from an address (through a relay the address is the
//! relay's business). The handshake must end within `connect_timeout`, which CONNECT shares.
//! A node not in `p2p.allow` (when it lists any) is refused by the node's endpoint as its
//! handshake completes, the first moment its id is proved (mqttd-p2p's `AllowList` says why
//! not sooner): the connection is closed with the QUIC application error 0x87, not
//! authorized, before the listener sees it, so not one MQTT byte is read from it or sent to
//! it. A reload (SIGHUP) replaces the list for the connections that come next.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mqttd_p2p::{
    AllowList, ConnectError, Connection, ConnectionError, ConnectionStats, Incoming, Node,
    NodeConfig, NodeId, NodeKey, PathKind, PathStats, RecvStream, RelayUrl, SendStream,
    StreamLimits, PING_ALPN,
};
use noq::{Path, VarInt};
use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{admit, Admission};
use crate::broker::Inner;
use crate::config::{Config, Listener};
use crate::drivers::now;
use crate::drivers::quic::QuicConn;
use crate::hooks::{Peer, Transport};
use crate::metrics::Metrics;
use crate::tls::generated_ca;

/// The ALPN of MQTT over a node connection, as over QUIC.
pub(crate) const ALPN_MQTT: &[u8] = b"mqtt";
/// How long, at shutdown, the node waits for its connections to end (each sends its
/// DISCONNECT first), and then for their closes to be sent.
const DRAIN: Duration = Duration::from_secs(2);
/// The QUIC application error code of a connection for an ALPN the broker does not serve.
const WRONG_PROTOCOL: u32 = 0x82;

/// A bound `p2p://` listener: the node, and who may connect.
#[derive(Debug)]
pub(crate) struct P2pListener {
    node: Node,
    /// The node ids of `p2p.allow`, which the node's endpoint checks.
    allow: AllowList,
}

/// The node ids of `p2p.allow`; `None` (any node) when it is empty.
pub(crate) fn allowed(config: &crate::config::P2pConfig) -> io::Result<Option<HashSet<NodeId>>> {
    if config.allow.is_empty() {
        return Ok(None);
    }
    config
        .allow
        .iter()
        .map(|id| {
            id.parse::<NodeId>()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("p2p.allow: {e}")))
        })
        .collect::<io::Result<HashSet<_>>>()
        .map(Some)
}

impl P2pListener {
    /// Starts the node of `listener` with the broker's key and the `[p2p]` settings. Its
    /// relays are `p2p.relays`, or the broker's own relay listener at `own_relay`.
    pub(crate) async fn bind(
        listener: &Listener,
        config: &Config,
        own_relay: Option<SocketAddr>,
    ) -> io::Result<Self> {
        let p2p = &config.p2p;
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
        let key = NodeKey::load_or_create(&config.data_dir.join(mqttd_p2p::KEY_FILE))
            .map_err(io::Error::other)?;
        let mut node = NodeConfig::new(key);
        node.bind = match listener.addr {
            // `p2p://` (or `p2p://0.0.0.0:0`): the table's addresses, else every interface.
            addr if addr.ip().is_unspecified() && addr.port() == 0 => p2p.bind.clone(),
            addr => vec![addr],
        };
        node.relays = p2p
            .relays
            .iter()
            .map(|url| {
                url.parse::<RelayUrl>()
                    .map_err(|e| invalid(format!("p2p.relays: {e}")))
            })
            .collect::<io::Result<_>>()?;
        if let Some(file) = &p2p.relay_cafile {
            node.relay_roots = load_roots(file)?;
        }
        if node.relays.is_empty() {
            if let Some(addr) = own_relay {
                node.relays = vec![own_relay_url(addr)?];
                if config.tls.cert_file.is_some() && p2p.relay_cafile.is_none() {
                    warn!(
                        listener = %listener.url,
                        relay = %node.relays[0],
                        "the node uses the broker's own relay at this URL: its certificate \
                         (tls.cert_file) must name it and chain to a known root, or set \
                         p2p.relays and p2p.relay_cafile"
                    );
                }
                // The relay's certificate is the broker's: its generated CA, if it uses that.
                let ca = generated_ca(&config.data_dir);
                if config.tls.cert_file.is_none() && ca.exists() {
                    node.relay_roots.extend(load_roots(&ca)?);
                }
            }
        }
        node.alpns = vec![ALPN_MQTT.to_vec(), PING_ALPN.to_vec()];
        let quic = &config.quic;
        node.streams = Some(StreamLimits::new(
            quic.peer_bidi_stream_count,
            quic.stream_recv_window_default,
            quic.conn_flow_control_window,
        ));
        let allow = AllowList::any();
        allow.set(allowed(p2p)?);
        node.allow = Some(allow.clone());
        let relays = node.relays.clone();
        let node = Node::bind(node).await.map_err(io::Error::other)?;
        info!(
            listener = %listener.url,
            node_id = %node.id(),
            bound = ?node.bound_addrs(),
            relays = ?relays.iter().map(ToString::to_string).collect::<Vec<_>>(),
            allowed = allow.len().unwrap_or(0),
            "peer-to-peer node bound"
        );
        Ok(Self { node, allow })
    }

    /// The node (its id and addresses).
    pub(crate) fn node(&self) -> &Node {
        &self.node
    }

    /// The allow-list the node checks (a reload replaces its contents).
    pub(crate) fn allow(&self) -> &AllowList {
        &self.allow
    }

    /// The first UDP address the node bound.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.node
            .bound_addrs()
            .first()
            .copied()
            .unwrap_or_else(|| (Ipv4Addr::UNSPECIFIED, 0).into())
    }

    /// Accepts connections until shutdown; then waits (at most [`DRAIN`]) for the connections
    /// to end, each with its DISCONNECT, and closes the node, which closes any left.
    pub(crate) async fn run(self, inner: Arc<Inner>, admission: Arc<Admission>, name: Arc<str>) {
        let connections = TaskTracker::new();
        // Both shown from the start, at 0.
        for path in ["direct", "relayed"] {
            inner.metrics.p2p_connections(path);
        }
        loop {
            let incoming = tokio::select! {
                _ = inner.shutdown.cancelled() => break,
                incoming = self.node.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
            };
            let path = incoming.path();
            let (addr, direct) = match &path {
                Some(PathKind::Direct(addr)) => (*addr, true),
                _ => ((Ipv4Addr::UNSPECIFIED, 0).into(), false),
            };
            let Some(permit) = admit(&inner, &admission, addr, direct) else {
                incoming.refuse();
                continue;
            };
            let attempt = Attempt {
                inner: inner.clone(),
                name: name.clone(),
                addr,
                path,
            };
            inner.tasks.spawn(connections.track_future(async move {
                attempt.open(incoming).await;
                drop(permit);
            }));
        }
        connections.close();
        let _ = tokio::time::timeout(DRAIN, connections.wait()).await;
        let _ = tokio::time::timeout(DRAIN, self.node.close()).await;
    }
}

/// The URL of the broker's own relay listener bound at `addr`: its address, or loopback for
/// an unspecified one (the generated certificate names both loopback addresses).
fn own_relay_url(addr: SocketAddr) -> io::Result<RelayUrl> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("https://{addr}")
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// The certificates of a PEM file.
pub(crate) fn load_roots(file: &std::path::Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let what = |e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("p2p.relay_cafile {}: {e}", file.display()),
        )
    };
    let roots = CertificateDer::pem_file_iter(file)
        .map_err(|e| what(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| what(&e))?;
    if roots.is_empty() {
        return Err(what(&"no certificate in it"));
    }
    Ok(roots)
}

/// A connection attempt the accept loop admitted, in its own task.
struct Attempt {
    inner: Arc<Inner>,
    name: Arc<str>,
    /// The peer's address if the attempt came straight from it; unspecified through a relay.
    addr: SocketAddr,
    /// The path of the attempt's first packet.
    path: Option<PathKind>,
}

impl Attempt {
    /// Runs the handshake under the CONNECT deadline (the node's endpoint checks the
    /// allow-list as it completes), and serves the connection by its ALPN.
    async fn open(self, incoming: Incoming) {
        let accepted = now();
        let limit = Duration::from_secs(self.inner.config.connect_timeout.max(1));
        let done = tokio::select! {
            done = tokio::time::timeout(limit, incoming.accept()) => done,
            _ = self.inner.shutdown.cancelled() => return,
        };
        let conn = match done {
            Ok(Ok(conn)) => conn,
            Ok(Err(ConnectError::Refused)) => {
                self.inner.metrics.p2p_refused.inc();
                info!(peer = %self.addr, listener = %self.name, "peer-to-peer node not in p2p.allow: refused");
                return;
            }
            Ok(Err(error)) => return self.failed(&error),
            Err(_) => return self.failed(&"not done within connect_timeout"),
        };
        let id = conn.remote_id();
        let direct = match conn.selected_path().map(|p| p.kind).or(self.path) {
            Some(kind) => kind.is_direct(),
            None => false,
        };
        self.inner
            .metrics
            .p2p_connections(if direct { "direct" } else { "relayed" })
            .inc();
        debug!(node_id = %id, peer = %self.addr, listener = %self.name, direct, "peer-to-peer connection open");
        match conn.alpn() {
            ALPN_MQTT => {
                let mut peer = Peer::new(Transport::P2p, self.addr, self.name.clone());
                peer.tls_identity = Some(Arc::from(id.to_string()));
                crate::drivers::quic::serve(self.inner, P2pConn(conn), peer, accepted).await;
            }
            PING_ALPN => {
                let answered = tokio::select! {
                    answered = mqttd_p2p::serve_pings(&conn) => answered,
                    _ = self.inner.shutdown.cancelled() => 0,
                };
                self.inner.metrics.p2p_pings.inc_by(answered);
                debug!(node_id = %id, answered, "pings answered");
                conn.close(0, b"");
            }
            // The node accepts only the ALPNs it was given.
            _ => conn.close(WRONG_PROTOCOL, b"unknown ALPN"),
        }
    }

    /// Counts and logs a failed handshake.
    fn failed(&self, error: &dyn std::fmt::Display) {
        self.inner.metrics.p2p_handshake_failures.inc();
        info!(peer = %self.addr, listener = %self.name, %error, "peer-to-peer handshake failed");
    }
}

/// A node's connection, as the QUIC driver drives it.
struct P2pConn(Connection);

impl QuicConn for P2pConn {
    fn accept_bi(
        &self,
    ) -> impl std::future::Future<Output = Result<(SendStream, RecvStream), ConnectionError>> + Send + '_
    {
        self.0.iroh().accept_bi()
    }

    fn close(&self, code: VarInt, reason: &[u8]) {
        self.0.iroh().close(code, reason);
    }

    fn close_reason(&self) -> Option<ConnectionError> {
        self.0.close_reason()
    }

    fn stats(&self) -> ConnectionStats {
        self.0.stats()
    }

    fn first_path(&self) -> Option<Path> {
        None
    }

    fn path_sample(&self, _held: Option<&Path>) -> (Option<PathStats>, Option<SocketAddr>) {
        match self.0.selected_path_stats() {
            Some((PathKind::Direct(addr), stats)) => (Some(stats), Some(addr)),
            Some((_, stats)) => (Some(stats), None),
            None => (None, None),
        }
    }

    fn open_gauge(metrics: &Metrics) -> &Gauge {
        &metrics.p2p_connections_open
    }
}
