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
//!
//! Diagnostics: each admitted attempt counts in `mqttd_p2p_traversal_attempts_total` under the
//! node's NAT type, and its outcome in `mqttd_p2p_traversals_total` (a direct path within
//! [`TRAVERSAL_WINDOW`], relay only, a failed handshake, refused); a task per connection
//! follows its traversal ([`Node::watch_traversal`]: one log line per phase), times the
//! first direct path and counts the bytes of direct and relayed paths. Another task keeps the
//! NAT type and each relay's state in the metrics.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqttd_p2p::{
    AllowList, ConnectError, Connection, ConnectionError, ConnectionStats, Incoming, NatType, Node,
    NodeConfig, NodeId, NodeKey, PathKind, PathStats, RecvStream, RelayState, RelayUrl, SendStream,
    StreamLimits, TraversalEvent, PING_ALPN,
};
use noq::{Path, VarInt};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
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
/// How long after its first packet a connection has to reach a direct path to count as
/// direct: three of iroh's hole-punching rounds (every 5 s).
pub(crate) const TRAVERSAL_WINDOW: Duration = Duration::from_secs(15);
/// How often the NAT type and the relays' states are copied into the metrics.
const STATE_INTERVAL: Duration = Duration::from_secs(2);
/// How long the start waits for the node to be registered with one of its relays. A relay
/// drops what peers send to a node it does not know yet, so a peer dialing through it as soon
/// as the listener is announced would wait for QUIC to resend its first packets (about a
/// second later); past this bound the broker starts anyway and the node keeps trying.
const RELAY_WAIT: Duration = Duration::from_secs(5);

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
        if !relays.is_empty() {
            wait_for_a_relay(&node).await;
        }
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
        for nat in NatType::ALL {
            inner.metrics.p2p_traversal_attempt(nat.as_str());
            for outcome in ["direct", "relay_only", "failed", "refused"] {
                inner.metrics.p2p_traversal(nat.as_str(), outcome);
            }
        }
        for path in ["direct", "relay"] {
            for direction in ["sent", "received"] {
                inner.metrics.p2p_path_bytes(path, direction);
            }
        }
        inner
            .tasks
            .spawn(connections.track_future(node_state(self.node.clone(), inner.clone())));
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
            let nat = self.node.nat_type().as_str();
            inner.metrics.p2p_traversal_attempt(nat).inc();
            let attempt = Attempt {
                inner: inner.clone(),
                node: self.node.clone(),
                name: name.clone(),
                addr,
                path,
                nat,
                started: Instant::now(),
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

/// Copies the node's NAT type and its relays' states into the metrics until shutdown.
async fn node_state(node: Node, inner: Arc<Inner>) {
    let all = NatType::ALL.map(NatType::as_str);
    let mut tick = tokio::time::interval(STATE_INTERVAL);
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        inner
            .metrics
            .p2p_set_nat_type(node.nat_type().as_str(), &all);
        for relay in node.relay_states() {
            inner.metrics.p2p_set_relay(
                &relay.url.to_string(),
                relay.home && relay.connected,
                relay.latency.map(|l| l.as_secs_f64()),
            );
        }
    }
}

/// Waits (at most [`RELAY_WAIT`]) until the node is connected to one of its relays, or every
/// relay has refused it; warns if none took it.
async fn wait_for_a_relay(node: &Node) {
    let settled = |states: &[RelayState]| {
        // Relays the node is not at home on are listed too, never denied: only home ones count.
        states.iter().any(|s| s.connected)
            || (states.iter().any(|s| s.home)
                && states.iter().filter(|s| s.home).all(|s| s.denied.is_some()))
    };
    let states = tokio::time::timeout(RELAY_WAIT, node.wait_relays(settled))
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| node.relay_states());
    if !states.iter().any(|s| s.connected) {
        warn!(
            relays = ?states
                .iter()
                .map(|s| format!(
                    "{}: {}",
                    s.url,
                    s.denied.as_deref().or(s.error.as_deref()).unwrap_or("not connected")
                ))
                .collect::<Vec<_>>(),
            "the node is on no relay yet: peers that need one cannot reach it until it is"
        );
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
    node: Node,
    name: Arc<str>,
    /// The peer's address if the attempt came straight from it; unspecified through a relay.
    addr: SocketAddr,
    /// The path of the attempt's first packet.
    path: Option<PathKind>,
    /// The node's NAT type when the attempt came, its label in the metrics.
    nat: &'static str,
    /// When the attempt came.
    started: Instant,
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
                self.inner.metrics.p2p_traversal(self.nat, "refused").inc();
                info!(peer = %self.addr, listener = %self.name, "peer-to-peer node not in p2p.allow: refused");
                return;
            }
            Ok(Err(error)) => return self.failed(&error),
            Err(_) => return self.failed(&"not done within connect_timeout"),
        };
        let id = conn.remote_id();
        let direct = match conn.selected_path().map(|p| p.kind).or(self.path.clone()) {
            Some(kind) => kind.is_direct(),
            None => false,
        };
        self.inner
            .metrics
            .p2p_connections(if direct { "direct" } else { "relayed" })
            .inc();
        debug!(node_id = %id, peer = %self.addr, listener = %self.name, direct, "peer-to-peer connection open");
        self.watch_traversal(&conn);
        let role = match conn.alpn() {
            ALPN_MQTT => Some(crate::peers::Role::Client),
            PING_ALPN => Some(crate::peers::Role::Ping),
            _ => None,
        };
        // In the admin API's list until this connection's task ends.
        let _registered =
            role.map(|role| self.inner.peers.register(&conn, role, self.name.clone()));
        match conn.alpn() {
            ALPN_MQTT => {
                let mut peer = Peer::new(Transport::P2p, self.addr, self.name.clone());
                peer.tls_identity = Some(Arc::from(id.to_string()));
                let conn = P2pConn {
                    conn,
                    started: self.started,
                    first_byte: self.inner.metrics.p2p_first_byte_seconds.clone(),
                    first_seen: AtomicBool::new(false),
                };
                crate::drivers::quic::serve(self.inner, conn, peer, accepted).await;
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

    /// Follows the traversal of `conn` in a task of its own, which ends with the connection:
    /// its outcome, the time to a direct path and the bytes of each kind of path go to the
    /// metrics.
    fn watch_traversal(&self, conn: &Connection) {
        let metrics = self.inner.clone();
        let (node, conn, nat, started) = (self.node.clone(), conn.clone(), self.nat, self.started);
        let bytes = |path, direction| metrics.metrics.p2p_path_bytes(path, direction);
        let (direct_sent, direct_received) = (bytes("direct", "sent"), bytes("direct", "received"));
        let (relay_sent, relay_received) = (bytes("relay", "sent"), bytes("relay", "received"));
        let mut direct_timed = false;
        self.inner.tasks.spawn(async move {
            node.watch_traversal(conn, started, TRAVERSAL_WINDOW, move |event| match event {
                TraversalEvent::Step(step) => {
                    let m = &metrics.metrics;
                    if step.phase == mqttd_p2p::traversal::Phase::DirectSelected && !direct_timed {
                        direct_timed = true;
                        m.p2p_direct_path_seconds
                            .observe(step.elapsed.as_secs_f64());
                    }
                    match step.outcome {
                        Some(mqttd_p2p::traversal::Outcome::Direct) => {
                            m.p2p_traversal(nat, "direct").inc();
                        }
                        Some(_) => {
                            m.p2p_traversal(nat, "relay_only").inc();
                        }
                        None => {}
                    }
                }
                TraversalEvent::Bytes {
                    direct,
                    sent,
                    received,
                } => {
                    let (s, r) = match direct {
                        true => (&direct_sent, &direct_received),
                        false => (&relay_sent, &relay_received),
                    };
                    s.inc_by(sent);
                    r.inc_by(received);
                }
                _ => {}
            })
            .await;
        });
    }

    /// Counts and logs a failed handshake.
    fn failed(&self, error: &dyn std::fmt::Display) {
        self.inner.metrics.p2p_handshake_failures.inc();
        self.inner.metrics.p2p_traversal(self.nat, "failed").inc();
        info!(peer = %self.addr, listener = %self.name, %error, "peer-to-peer handshake failed");
    }
}

/// A node's connection, as the QUIC driver drives it.
struct P2pConn {
    conn: Connection,
    /// When the attempt came.
    started: Instant,
    /// Where the time to the first stream byte goes.
    first_byte: Histogram,
    /// Whether a stream came yet.
    first_seen: AtomicBool,
}

impl QuicConn for P2pConn {
    async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        let streams = self.conn.iroh().accept_bi().await?;
        // A peer's stream is known to the broker with its first bytes.
        if !self.first_seen.swap(true, Ordering::Relaxed) {
            self.first_byte
                .observe(self.started.elapsed().as_secs_f64());
        }
        Ok(streams)
    }

    fn close(&self, code: VarInt, reason: &[u8]) {
        self.conn.iroh().close(code, reason);
    }

    fn close_reason(&self) -> Option<ConnectionError> {
        self.conn.close_reason()
    }

    fn stats(&self) -> ConnectionStats {
        self.conn.stats()
    }

    fn first_path(&self) -> Option<Path> {
        None
    }

    fn path_sample(&self, _held: Option<&Path>) -> (Option<PathStats>, Option<SocketAddr>) {
        match self.conn.selected_path_stats() {
            Some((PathKind::Direct(addr), stats)) => (Some(stats), Some(addr)),
            Some((_, stats)) => (Some(stats), None),
            None => (None, None),
        }
    }

    fn open_gauge(metrics: &Metrics) -> &Gauge {
        &metrics.p2p_connections_open
    }

    fn probe(&self) -> crate::broker::PathProbe {
        let weak = self.conn.downgrade();
        crate::broker::PathProbe(Box::new(move || {
            let (kind, stats) = weak.upgrade()?.selected_path_stats()?;
            let (remote, relay) = match kind {
                PathKind::Direct(addr) => (Some(addr), None),
                PathKind::Relayed(url) => (None, Some(url.to_string())),
                _ => (None, None),
            };
            Some(crate::drivers::quic::path_view(&stats, remote, relay))
        }))
    }
}
