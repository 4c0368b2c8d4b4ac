//! The node: an iroh endpoint configured to use no public infrastructure, and the
//! connections it makes and accepts.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iroh::endpoint::{self, presets, ConnectWithOptsError, ConnectingError, NetReportConfig};
use iroh::tls::CaTlsConfig;
use iroh::Watcher;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::addr::{NodeAddr, RelayUrl};
use crate::allow::{AllowHook, AllowList};
use crate::key::{NodeId, NodeKey};
use crate::nat::{classify, local_addrs, MappingReport, NatType};
use crate::path::{current_paths, PathEvents, PathInfo, PathKind};
use crate::retry::Retry;
use crate::traversal::TraversalEvent;

pub use iroh::endpoint::{ConnectionError, ConnectionStats, PathStats, RecvStream, SendStream};

/// How a node runs. Settings will be added: start from [`NodeConfig::new`] and assign the
/// fields to change.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeConfig {
    /// The node's identity.
    pub key: NodeKey,
    /// UDP addresses to bind for direct paths; empty for `0.0.0.0:0` and `[::]:0` (the IPv6
    /// one only if the system has IPv6). Unused without `direct_paths`.
    pub bind: Vec<SocketAddr>,
    /// Relays to use; the node stays connected to the one nearest by latency (its home relay)
    /// and reaches peers through any. Empty: direct paths only.
    pub relays: Vec<RelayUrl>,
    /// Extra CA certificates (DER) to trust for relays' HTTPS and QUIC certificates, such
    /// as a broker's generated local CA (`<data_dir>/tls/ca.pem`).
    pub relay_roots: Vec<CertificateDer<'static>>,
    /// Whether relays' certificates may also chain to the Mozilla root store compiled in
    /// (nothing is fetched); on by default.
    pub webpki_roots: bool,
    /// The ALPN protocols this node accepts connections for; empty to accept none (it may
    /// still connect).
    pub alpns: Vec<Vec<u8>>,
    /// Whether to use direct UDP paths at all; without them every connection goes through a
    /// relay.
    pub direct_paths: bool,
    /// Limits on the streams peers open and on what they may send ahead of the reader; iroh's
    /// defaults when `None`.
    pub streams: Option<StreamLimits>,
    /// The peers that may connect to this node; any when `None`. Others' connections are
    /// closed by the endpoint as their handshake completes (see [`AllowList`]).
    pub allow: Option<AllowList>,
}

/// What a peer may open on a connection and send ahead of the reader (QUIC flow control).
/// Start from [`StreamLimits::new`] and assign the fields to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamLimits {
    /// Bidirectional streams a peer may have open at once.
    pub max_bidi_streams: u32,
    /// Unidirectional streams a peer may have open at once.
    pub max_uni_streams: u32,
    /// Bytes a peer may send on one stream ahead of the reader.
    pub stream_receive_window: u32,
    /// Bytes a peer may send on all streams of a connection ahead of the reader.
    pub receive_window: u32,
}

impl StreamLimits {
    /// `max_bidi_streams` bidirectional streams, no unidirectional ones, and the windows given.
    pub fn new(max_bidi_streams: u32, stream_receive_window: u32, receive_window: u32) -> Self {
        Self {
            max_bidi_streams,
            max_uni_streams: 0,
            stream_receive_window,
            receive_window,
        }
    }

    fn to_iroh(self) -> endpoint::QuicTransportConfig {
        endpoint::QuicTransportConfig::builder()
            .max_concurrent_bidi_streams(self.max_bidi_streams.into())
            .max_concurrent_uni_streams(self.max_uni_streams.into())
            .stream_receive_window(self.stream_receive_window.into())
            .receive_window(self.receive_window.into())
            // What the node buffers unacknowledged per connection: bounded like what it
            // receives.
            .send_window(u64::from(self.receive_window))
            .build()
    }
}

impl NodeConfig {
    /// Defaults for a node with `key`: bound on all interfaces, no relays, no ALPNs.
    pub fn new(key: NodeKey) -> Self {
        Self {
            key,
            bind: Vec::new(),
            relays: Vec::new(),
            relay_roots: Vec::new(),
            webpki_roots: true,
            alpns: Vec::new(),
            direct_paths: true,
            streams: None,
            allow: None,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// A bind address is unusable.
    #[error("invalid bind address {addr}: {source}")]
    Address {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The sockets or the QUIC endpoint could not be made.
    #[error("cannot start the node: {source}")]
    Endpoint {
        /// Why (iroh's error).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Why a connection could not be made or accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The peer has no relay or direct address, and this node has no relay to try.
    #[error("no address for node {0}: give a relay or a direct address")]
    NoAddress(NodeId),
    /// A node cannot connect to itself.
    #[error("a node cannot connect to itself")]
    SelfConnect,
    /// The ALPN is empty.
    #[error("the ALPN is empty")]
    InvalidAlpn,
    /// The node is closed.
    #[error("the node is closed")]
    Closed,
    /// No connection within the deadline of [`Node::connect_with_retry`].
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    /// The peer completed its handshake but is not on this node's [`AllowList`]: its
    /// connection was closed with [`crate::REFUSED`] (the node logs its id).
    #[error("the node is not on the allow-list")]
    Refused,
    /// The QUIC handshake failed: the peer is unreachable, refused the ALPN, or is not the
    /// node it should be.
    #[error("handshake failed: {source}")]
    Handshake {
        /// Why (iroh's error).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A running node. Cheap to clone; every clone is the same node.
#[derive(Clone)]
pub struct Node {
    endpoint: iroh::Endpoint,
    relays: Arc<[RelayUrl]>,
    nat: Arc<NatWatch>,
    /// The home-relay watch ([`watch_home_relay`]), stopped when the last clone goes.
    _watch: Option<Arc<AbortOnDrop>>,
}

/// The NAT type as last classified, and the task that keeps it (stopped with the last clone
/// of the node).
struct NatWatch {
    current: watch::Receiver<NatType>,
    _task: AbortOnDrop,
}

/// Classifies each net report of `endpoint` (bound at `bound`), keeps the type in `current`
/// and logs each change.
async fn watch_nat(
    mut reports: impl Watcher<Value = Option<iroh::unstable_net_report::NetReport>>,
    bound: Vec<SocketAddr>,
    id: NodeId,
    current: watch::Sender<NatType>,
) {
    loop {
        if let Some(report) = reports.get() {
            let public = report
                .global_v4
                .map(SocketAddr::V4)
                .or(report.global_v6.map(SocketAddr::V6));
            let mapping = MappingReport::new(public, report.mapping_varies_by_dest());
            let nat = classify(&mapping, &local_addrs(&bound, public));
            if current.send_replace(nat) != nat {
                info!(node_id = %id.fmt_short(), nat = %nat, public = ?public, varies = ?mapping.varies_by_destination, "NAT type");
            }
        }
        if reports.updated().await.is_err() {
            return;
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The backoff between searches for a home relay while none takes the node: the first wait
/// is 3 to 6 s (a measurement waits up to 3 s for a relay that does not answer: iroh's probe
/// timeout), doubling up to 20 to 40 s.
fn home_backoff() -> mqttd_proto::backoff::Backoff {
    mqttd_proto::backoff::Backoff::new(Duration::from_secs(6), Duration::from_secs(40))
}

/// Keeps a node with several relays at home on one that works.
///
/// iroh picks the home relay (the one peers reach the node through) from its periodic
/// measurement of every relay, which runs every 20 to 26 s; when the home relay goes away it
/// only redials it, so for up to that long nobody can reach the node through the others.
/// This watch notices the loss at once (the relay connection breaks) and makes iroh measure
/// again now, by re-inserting the lost relay's configuration (a changed relay map triggers a
/// new measurement); iroh then moves home to the best relay that answered. While no relay
/// takes the node it searches again with exponential backoff and jitter.
async fn watch_home_relay(endpoint: iroh::Endpoint, relays: Arc<[RelayUrl]>) {
    let lost = |states: &[endpoint::RelayStatus]| {
        !states.is_empty() && states.iter().all(|s| !s.is_connected())
    };
    let mut status = endpoint.home_relay_status();
    let mut backoff = home_backoff();
    // Lost means lost after having had one: at the start the home relay is still being dialed.
    let mut had_home = false;
    loop {
        let mut states = status.get();
        while !(had_home && lost(&states)) {
            if states.iter().any(|s| s.is_connected()) {
                had_home = true;
                backoff.reset();
            }
            tokio::select! {
                update = status.updated() => match update {
                    Ok(update) => states = update,
                    Err(_) => return,
                },
                _ = endpoint.closed() => return,
            }
        }
        let gone: Vec<String> = states.iter().map(|s| s.url().to_string()).collect();
        warn!(home = ?gone, relays = relays.len(), "home relay lost; measuring the relays again");
        for state in &states {
            if let Some(url) = relays.iter().find(|r| &r.0 == state.url()) {
                let _ = endpoint
                    .insert_relay(url.0.clone(), Arc::new(url.to_config()))
                    .await;
            }
        }
        let wait = backoff.next(mqttd_proto::backoff::random_unit());
        let found = tokio::select! {
            found = tokio::time::timeout(wait, async {
                loop {
                    match status.updated().await {
                        Ok(states) if !lost(&states) => return Some(states),
                        Ok(_) => {}
                        Err(_) => return None,
                    }
                }
            }) => found,
            _ = endpoint.closed() => return,
        };
        match found {
            Ok(Some(states)) => {
                let home: Vec<String> = states
                    .iter()
                    .filter(|s| s.is_connected())
                    .map(|s| s.url().to_string())
                    .collect();
                info!(?home, "home relay back");
            }
            Ok(None) => return,
            Err(_) => debug!(?wait, "no relay took the node yet; searching again"),
        }
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id())
            .field("relays", &self.relays)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Binds the node's sockets and starts it.
    ///
    /// What is configured off, so that the node contacts only what `config` names: address
    /// lookup (no DNS or pkarr publishing or resolving: peers' addresses are given or come
    /// through the relays), n0's default relays (`RelayMode::Custom` with `config.relays`
    /// only, or no relay), port mapping (UPnP, PCP, NAT-PMP), the captive-portal check
    /// (which probes `http://RELAY/` on port 80, where an mqttd relay does not listen), and
    /// the public fallback nameservers: relay host names are resolved by the system's
    /// nameservers only (a relay URL with an IP address needs none).
    pub async fn bind(config: NodeConfig) -> Result<Self, BindError> {
        let relays: Arc<[RelayUrl]> = config.relays.into();
        let relay_mode = match relays.is_empty() {
            true => iroh::RelayMode::Disabled,
            false => iroh::RelayMode::Custom(relays.iter().map(RelayUrl::to_config).collect()),
        };
        let ca = match config.webpki_roots {
            true => CaTlsConfig::embedded().with_extra_roots(config.relay_roots),
            false => CaTlsConfig::custom_roots(config.relay_roots),
        };
        let mut net_report = NetReportConfig::default();
        net_report.captive_portal_check = false;
        // `Minimal` sets only the crypto provider (ring); no address lookup is added.
        let dns = iroh::dns::DnsResolver::builder()
            .with_system_defaults()
            .disable_fallback()
            .build();
        let mut builder = iroh::Endpoint::builder(presets::Minimal)
            .secret_key(config.key.0)
            .dns_resolver(dns)
            .alpns(config.alpns)
            .relay_mode(relay_mode)
            .ca_tls_config(ca)
            .net_report_config(net_report)
            .portmapper_config(endpoint::PortmapperConfig::Disabled);
        if let Some(limits) = config.streams {
            builder = builder.transport_config(limits.to_iroh());
        }
        if let Some(allow) = config.allow {
            builder = builder.hooks(AllowHook(allow));
        }
        if !config.direct_paths {
            builder = builder.clear_ip_transports();
        } else if !config.bind.is_empty() {
            builder = builder.clear_ip_transports();
            for addr in config.bind {
                builder = builder
                    .bind_addr(addr)
                    .map_err(|source| BindError::Address {
                        addr,
                        source: Box::new(source),
                    })?;
            }
        }
        let endpoint = builder.bind().await.map_err(|source| BindError::Endpoint {
            source: Box::new(source),
        })?;
        debug!(node_id = %endpoint.id(), relays = relays.len(), "node bound");
        let (tx, current) = watch::channel(NatType::Unknown);
        let task = tokio::spawn(watch_nat(
            endpoint.net_report(),
            endpoint.bound_sockets(),
            NodeId(endpoint.id()),
            tx,
        ));
        // With one relay there is nowhere else to go: iroh redials it.
        let watch = (relays.len() > 1).then(|| {
            Arc::new(AbortOnDrop(tokio::spawn(watch_home_relay(
                endpoint.clone(),
                relays.clone(),
            ))))
        });
        Ok(Self {
            endpoint,
            relays,
            nat: Arc::new(NatWatch {
                current,
                _task: AbortOnDrop(task),
            }),
            _watch: watch,
        })
    }

    /// The NAT type the relays' answers show now ([`NatType::Unknown`] until two relays on
    /// different addresses answered; see [`crate::nat`]).
    pub fn nat_type(&self) -> NatType {
        *self.nat.current.borrow()
    }

    /// Waits until the NAT type is known (not [`NatType::Unknown`]) and returns it; it never
    /// is with fewer than two relays, so bound the wait.
    pub async fn nat_type_known(&self) -> NatType {
        let mut current = self.nat.current.clone();
        let known = current
            .wait_for(|t| *t != NatType::Unknown)
            .await
            .map(|t| *t);
        match known {
            Ok(t) => t,
            Err(_) => std::future::pending().await,
        }
    }

    /// Reports the traversal of `conn`, begun at `started`, until it closes: logs one line
    /// per phase (see [`crate::traversal`]) and hands `report` each phase and the bytes each
    /// kind of path carried. The outcome is direct if a direct path carries the data within
    /// `window`, else relay only. The watch does not keep the connection open.
    pub async fn watch_traversal(
        &self,
        conn: Connection,
        started: Instant,
        window: Duration,
        report: impl FnMut(TraversalEvent) + Send,
    ) {
        crate::traversal::watch(self, conn, started, window, report).await
    }

    /// The node's id.
    pub fn id(&self) -> NodeId {
        NodeId(self.endpoint.id())
    }

    /// The node's address as it knows it now: its home relay (once it has one) and the
    /// direct addresses it found on its interfaces.
    pub fn addr(&self) -> NodeAddr {
        NodeAddr::from_iroh(&self.endpoint.addr())
    }

    /// The local addresses of the node's UDP sockets (the ports chosen for port 0).
    pub fn bound_addrs(&self) -> Vec<SocketAddr> {
        self.endpoint.bound_sockets()
    }

    /// The relays this node was configured with.
    pub fn relays(&self) -> &[RelayUrl] {
        &self.relays
    }

    /// Waits until the node is connected to a relay (forever without relays, or while every
    /// relay refuses it: see [`Node::wait_relays`]).
    pub async fn online(&self) {
        self.endpoint.online().await
    }

    /// The state of each configured relay now: whether it is a home relay and connected
    /// (iroh keeps one connection, to the relay nearest by latency, and moves to another
    /// when that one stops answering), and its latency in the last net report (`None`: it did
    /// not answer).
    pub fn relay_states(&self) -> Vec<RelayState> {
        self.to_states(self.endpoint.home_relay_status().get())
    }

    /// Waits until `done` holds for the state of the home relays, and returns that state;
    /// `None` if the node is dropped first.
    pub async fn wait_relays(
        &self,
        mut done: impl FnMut(&[RelayState]) -> bool,
    ) -> Option<Vec<RelayState>> {
        let mut watcher = self.endpoint.home_relay_status();
        let mut states = self.to_states(watcher.get());
        while !done(&states) {
            states = self.to_states(watcher.updated().await.ok()?);
        }
        Some(states)
    }

    /// The configured relays' states, from the home relays' `statuses` and the last net
    /// report's latencies.
    fn to_states(&self, statuses: Vec<endpoint::RelayStatus>) -> Vec<RelayState> {
        let report = self.endpoint.net_report().get();
        let latency = |url: &iroh::RelayUrl| {
            report.as_ref().and_then(|r| {
                r.relay_latency
                    .iter()
                    .filter(|(_, u, _)| *u == url)
                    .map(|(_, _, l)| l)
                    .min()
            })
        };
        let mut states: Vec<RelayState> = statuses
            .into_iter()
            .map(|s| RelayState {
                url: RelayUrl(s.url().clone()),
                home: true,
                connected: s.is_connected(),
                denied: s.auth_denied_reason().map(str::to_owned),
                error: s.last_error().map(|e| e.to_string()),
                latency: latency(s.url()),
            })
            .collect();
        for relay in self.relays.iter() {
            if !states.iter().any(|s| s.url == *relay) {
                states.push(RelayState {
                    url: relay.clone(),
                    home: false,
                    connected: false,
                    denied: None,
                    error: None,
                    latency: latency(&relay.0),
                });
            }
        }
        states
    }

    /// Connects to `to` for protocol `alpn` as [`Node::connect`] does, trying again after a
    /// failed handshake (the peer or its relay not there yet, a path that did not work) with
    /// `retry`'s backoff until its attempts or its deadline run out; each attempt is bounded by
    /// what is left of the deadline. Errors that another try cannot mend (no address, a bad
    /// ALPN, the node closed) return at once. The last error is returned.
    pub async fn connect_with_retry(
        &self,
        to: impl Into<NodeAddr>,
        alpn: &[u8],
        retry: &Retry,
    ) -> Result<Connection, ConnectError> {
        let to = to.into();
        let deadline = tokio::time::Instant::now() + retry.deadline;
        let mut backoff = retry.backoff();
        loop {
            let error =
                match tokio::time::timeout_at(deadline, self.connect(to.clone(), alpn)).await {
                    Ok(Ok(conn)) => return Ok(conn),
                    Ok(Err(error @ ConnectError::Handshake { .. })) => error,
                    Ok(Err(error)) => return Err(error),
                    Err(_) => return Err(ConnectError::Timeout(retry.deadline)),
                };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(wait) =
                retry.after_failure(&mut backoff, left, mqttd_proto::backoff::random_unit())
            else {
                return Err(error);
            };
            let attempts = backoff.failures();
            debug!(peer = %to.id.fmt_short(), attempts, wait_ms = wait.as_millis() as u64, %error, "connect failed; trying again");
            tokio::time::sleep(wait).await;
        }
    }

    /// Connects to `to` for protocol `alpn`, at its relay and direct addresses and through
    /// each of this node's relays: the peer is at home on one relay only, maybe not the one
    /// named (peers of one deployment share their relays, and each picks the nearest), and
    /// iroh sends the first packets to every address it knows until one path works.
    pub async fn connect(
        &self,
        to: impl Into<NodeAddr>,
        alpn: &[u8],
    ) -> Result<Connection, ConnectError> {
        let to = to.into();
        let addr = to.to_iroh().with_addrs(
            self.relays
                .iter()
                .map(|r| iroh::TransportAddr::Relay(r.0.clone())),
        );
        if addr.is_empty() {
            return Err(ConnectError::NoAddress(to.id));
        }
        let connecting = self
            .endpoint
            .connect_with_opts(addr, alpn, Default::default())
            .await
            .map_err(|e| match e {
                ConnectWithOptsError::SelfConnect { .. } => ConnectError::SelfConnect,
                ConnectWithOptsError::InvalidAlpn { .. } => ConnectError::InvalidAlpn,
                ConnectWithOptsError::EndpointClosed { .. } => ConnectError::Closed,
                ConnectWithOptsError::NoAddress { .. } => ConnectError::NoAddress(to.id),
                other => handshake(other),
            })?;
        let conn = connecting.await.map_err(connecting_error)?;
        Ok(Connection { inner: conn })
    }

    /// The next incoming connection attempt; `None` once the node is closed. Only ALPNs in
    /// [`NodeConfig::alpns`] get this far.
    pub async fn accept(&self) -> Option<Incoming> {
        self.endpoint.accept().await.map(|inner| Incoming { inner })
    }

    /// Closes every connection (code 0) and the node's sockets, and waits for that to be
    /// sent.
    pub async fn close(&self) {
        self.endpoint.close().await
    }

    /// The iroh endpoint underneath, for what this crate does not wrap yet.
    pub fn endpoint(&self) -> &iroh::Endpoint {
        &self.endpoint
    }
}

fn handshake(e: impl std::error::Error + Send + Sync + 'static) -> ConnectError {
    ConnectError::Handshake {
        source: Box::new(e),
    }
}

fn connecting_error(e: ConnectingError) -> ConnectError {
    match e {
        ConnectingError::ConnectionError {
            source: ConnectionError::LocallyClosed,
            ..
        } => ConnectError::Closed,
        other => handshake(other),
    }
}

/// The state of the connection to one home relay.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayState {
    /// The relay.
    pub url: RelayUrl,
    /// Whether it is a home relay: one the node stays connected to, and peers reach it at.
    pub home: bool,
    /// Whether the node is connected and registered with it (only home relays are watched).
    pub connected: bool,
    /// The reason the relay gave for refusing the node, if it did last time (it will keep
    /// refusing until its access rules change).
    pub denied: Option<String>,
    /// The last connection error, if the last attempt failed.
    pub error: Option<String>,
    /// The lowest round-trip time to it in the last net report (QUIC address discovery or
    /// HTTPS probe); `None` if it did not answer.
    pub latency: Option<Duration>,
}

/// A connection attempt from a peer, before the handshake.
#[derive(Debug)]
pub struct Incoming {
    inner: endpoint::Incoming,
}

impl Incoming {
    /// Where the attempt came from: straight from an address, or through a relay.
    pub fn path(&self) -> Option<PathKind> {
        match self.inner.remote_addr() {
            endpoint::IncomingAddr::Ip(addr) => Some(PathKind::Direct(addr)),
            endpoint::IncomingAddr::Relay { url, .. } => Some(PathKind::Relayed(RelayUrl(url))),
            _ => None,
        }
    }

    /// Runs the handshake and returns the connection; [`ConnectError::Refused`] for a peer
    /// the node's [`AllowList`] does not name.
    pub async fn accept(self) -> Result<Connection, ConnectError> {
        let conn = self.inner.await.map_err(|e| match e {
            ConnectingError::LocallyRejected { .. } => ConnectError::Refused,
            e => connecting_error(e),
        })?;
        Ok(Connection { inner: conn })
    }

    /// Refuses the attempt (the peer sees the connection refused).
    pub fn refuse(self) {
        self.inner.refuse()
    }
}

/// A connection to a peer, over whichever of its paths iroh chooses. Cheap to clone; the
/// connection closes when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Connection {
    inner: endpoint::Connection,
}

impl Connection {
    /// The peer's id, proved by the handshake.
    pub fn remote_id(&self) -> NodeId {
        NodeId(self.inner.remote_id())
    }

    /// The protocol the handshake agreed on.
    pub fn alpn(&self) -> &[u8] {
        self.inner.alpn()
    }

    /// Opens a bidirectional stream. The peer learns of it when the first bytes arrive.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        self.inner.open_bi().await
    }

    /// Waits for the peer to open a bidirectional stream.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        self.inner.accept_bi().await
    }

    /// The paths open now.
    pub fn paths(&self) -> Vec<PathInfo> {
        current_paths(&self.inner)
    }

    /// The path carrying application data now.
    pub fn selected_path(&self) -> Option<PathInfo> {
        self.paths().into_iter().find(|p| p.selected)
    }

    /// The path events from now on (see [`PathEvents`]).
    pub fn path_events(&self) -> PathEvents {
        PathEvents::new(&self.inner)
    }

    /// The round-trip time of the selected path.
    pub fn rtt(&self) -> Option<Duration> {
        self.selected_path().map(|p| p.rtt)
    }

    /// The QUIC statistics of the selected path, and how it reaches the peer.
    pub fn selected_path_stats(&self) -> Option<(PathKind, PathStats)> {
        self.inner
            .paths()
            .iter()
            .filter(|p| p.is_selected())
            .find_map(|p| Some((PathKind::from_transport(p.remote_addr())?, p.stats())))
    }

    /// The connection's QUIC statistics, over all its paths (closed ones included).
    pub fn stats(&self) -> ConnectionStats {
        self.inner.stats()
    }

    /// Why the connection closed; `None` while it is open.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        self.inner.close_reason()
    }

    /// Closes the connection with an application error `code` and `reason`.
    pub fn close(&self, code: u32, reason: &[u8]) {
        self.inner.close(code.into(), reason)
    }

    /// Waits until the connection is closed, and says why.
    pub async fn closed(&self) -> ConnectionError {
        self.inner.closed().await
    }

    /// The iroh connection underneath.
    pub fn iroh(&self) -> &endpoint::Connection {
        &self.inner
    }

    /// A handle that does not keep the connection open.
    pub fn downgrade(&self) -> WeakConnection {
        WeakConnection(self.inner.weak_handle())
    }
}

/// A [`Connection`] that does not keep it open (from [`Connection::downgrade`]).
#[derive(Debug, Clone)]
pub struct WeakConnection(endpoint::WeakConnectionHandle);

impl WeakConnection {
    /// The connection, while it is open somewhere else.
    pub fn upgrade(&self) -> Option<Connection> {
        self.0.upgrade().map(|inner| Connection { inner })
    }
}
