//! Broker metrics, exported in the Prometheus text format.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::hooks::Transport;

/// Counters and gauges the broker updates as it works. Each is a relaxed atomic, cheap enough
/// for the routing path; the one histogram, `quic_rtt_seconds`, takes a lock, and is observed
/// once per QUIC connection every `quic.stats_interval`.
///
/// The `quic_*` counters of packets, bytes, losses, congestion and paths grow as each QUIC
/// connection's driver looks at its statistics (every `quic.stats_interval`, and at
/// disconnect), by what grew since its last look.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Connections accepted by the listeners.
    pub connections_accepted: Counter,
    /// Connections refused before CONNECT (limits).
    pub connections_refused: Counter,
    /// Connections open now.
    pub connections_open: Gauge,
    /// Idle TCP connections parked now, without a task of their own.
    pub connections_parked: Gauge,
    /// Clients connected (CONNACK sent) now.
    pub clients_connected: Gauge,
    /// Clients connected now, by `transport`: see [`Self::clients_by_transport`].
    clients_by_transport: ByTransport,
    /// PUBLISH packets received from clients.
    pub messages_received: Counter,
    /// PUBLISH packets sent to clients.
    pub messages_sent: Counter,
    /// Deliveries handed to sessions by routing.
    pub routed: Counter,
    /// Messages dropped: queue full, expired, too large, or refused by a hook or ACL.
    pub messages_dropped: Counter,
    /// Bytes read from clients.
    pub bytes_received: Counter,
    /// Bytes written to clients.
    pub bytes_sent: Counter,
    /// Wills published.
    pub wills: Counter,
    /// Sessions taken over by a new connection.
    pub takeovers: Counter,
    /// Connections closed for a protocol violation or malformed packet.
    pub protocol_errors: Counter,
    /// Failed authentications.
    pub auth_failures: Counter,
    /// TLS handshakes that failed (a certificate refused, not TLS at all, the client gave up).
    pub tls_handshake_failures: Counter,
    /// TLS handshakes not done within `connect_timeout`.
    pub tls_handshake_timeouts: Counter,
    /// QUIC connections open now (handshake done or 0-RTT accepted, MQTT not yet over).
    pub quic_connections: Gauge,
    /// QUIC handshakes that reached MQTT (ALPN `mqtt`).
    pub quic_handshakes: Counter,
    /// QUIC handshakes that failed or did not end within `connect_timeout`.
    pub quic_handshake_failures: Counter,
    /// Stateless Retries sent to clients whose address was not validated while many
    /// handshakes were in progress.
    pub quic_retries: Counter,
    /// QUIC packets sent: ACK-only packets, MTU probes and the packets that carry again what
    /// lost ones carried included.
    pub quic_sent_packets: Counter,
    /// Bytes of the QUIC packets sent, without UDP and IP headers and without ACK-only
    /// packets (as lost bytes are counted).
    pub quic_sent_bytes: Counter,
    /// QUIC packets declared lost, ACK-only packets and MTU probes included. What a lost
    /// packet carried that is still needed (stream data, control frames) is sent again in new
    /// packets, counted in `quic_sent_packets`; noq counts no retransmissions apart.
    pub quic_lost_packets: Counter,
    /// Bytes of the lost QUIC packets that carried more than ACKs (MTU probes included): the
    /// closest measure of what had to be retransmitted.
    pub quic_lost_bytes: Counter,
    /// Lost QUIC packets that were MTU probes: probes larger than the path allows are lost by
    /// design, and nothing of theirs is sent again.
    pub quic_lost_mtu_probes: Counter,
    /// Congestion events: the congestion controller cut its window for a loss (or an ECN mark).
    pub quic_congestion_events: Counter,
    /// PATH_CHALLENGE frames sent: a client seen on a new address is challenged there
    /// (again if the challenge is lost) before the broker sends it much.
    pub quic_path_challenges: Counter,
    /// Changes of a QUIC connection's client address that the broker noticed (it compares at
    /// each look at the statistics, so two within one `quic.stats_interval` count once).
    pub quic_path_changes: Counter,
    /// The smoothed RTT of QUIC connections, observed at each look at their statistics: a
    /// connection open for a minute counts six times with the default interval.
    pub quic_rtt_seconds: Histogram,
    /// QUIC data streams the broker reset for a malformed packet.
    pub quic_stream_resets: Counter,
    /// The receive buffer of the QUIC listeners' UDP sockets, in bytes, as the kernel
    /// reports it (the last listener bound).
    pub quic_socket_recv_buffer_bytes: Gauge,
    /// The send buffer of the QUIC listeners' UDP sockets, in bytes, as the kernel reports it.
    pub quic_socket_send_buffer_bytes: Gauge,
    /// Datagrams the QUIC listeners dropped before noq read them or after noq wrote them, by
    /// `reason`: see [`Self::quic_datagrams_dropped`].
    quic_datagrams_dropped: QuicDropped,
    /// Connections the `p2p://` listener accepted, by the path they came on: `direct` or
    /// `relayed` (see [`Self::p2p_connections`]).
    p2p_connections: P2pAccepted,
    /// `p2p://` connections serving MQTT now.
    pub p2p_connections_open: Gauge,
    /// `p2p://` connections refused after the handshake: the node is not in `p2p.allow`.
    pub p2p_refused: Counter,
    /// `p2p://` handshakes that failed or did not end within `connect_timeout`.
    pub p2p_handshake_failures: Counter,
    /// Pings the `p2p://` listener answered (`mqttd p2p ping`), counted when their
    /// connection ends.
    pub p2p_pings: Counter,
    /// Connection attempts the `p2p://` listener admitted, by the node's NAT type (`nat`,
    /// see [`Self::p2p_traversal`]).
    p2p_traversal_attempts: P2pByNat,
    /// How those attempts ended, by NAT type and `outcome`: `direct` (a direct path carried
    /// the data within the traversal window), `relay_only`, `failed` (the handshake),
    /// `refused` (`p2p.allow`).
    p2p_traversals: P2pOutcomes,
    /// From a `p2p://` MQTT connection's first packet to its first stream's first byte.
    pub p2p_first_byte_seconds: Histogram,
    /// From a `p2p://` connection's first packet to a direct path carrying its data.
    pub p2p_direct_path_seconds: Histogram,
    /// Bytes `p2p://` connections carried, by `path` (`direct`, `relay`) and `direction`
    /// (`sent`, `received`): UDP payloads, sampled every 2 s and at path changes.
    p2p_path_bytes: P2pBytes,
    /// The node's NAT type: 1 for the type detected now (label `nat`), 0 for the others.
    p2p_nat_type: P2pNatGauge,
    /// Per relay of the `p2p://` node (label `relay`): 1 while it is a home relay and
    /// connected, else 0.
    p2p_relay_up: P2pRelayGauges,
    /// Per relay: the round-trip time in the node's last net report, in seconds; 0 if it did
    /// not answer.
    p2p_relay_latency_seconds: P2pRelayLatency,
    /// Sessions held, connected or not.
    pub sessions: Gauge,
    /// Subscriptions held.
    pub subscriptions: Gauge,
    /// Retained messages held.
    pub retained_messages: Gauge,
    /// Bytes of the retained messages held (topic, payload and properties), as counted
    /// against `max_retained_bytes`.
    pub retained_bytes: Gauge,
    /// Persistent sessions held, connected or not, as counted against `max_sessions`.
    pub persistent_sessions: Gauge,
    /// Requests refused by a configured limit, by `limit`: see [`Self::limit_refused`].
    limit_refusals: LimitRefusals,
    /// Timer tasks of offline sessions (will delay, session expiry) running now: at most one
    /// per offline session.
    pub session_timers: Gauge,
    /// Failed operations of the durable store, by `op`: `write` (recording a change),
    /// `sync` (making changes durable), `open` (opening the store again after a failure).
    pub(crate) store_errors: crate::storage::ErrorCounters,
    /// Per bridge (label `bridge`): 1 while connected to its remote broker, else 0.
    bridge_up: BridgeGauges,
    /// Per bridge: messages from its remote broker published here.
    bridge_messages_in: BridgeCounters,
    /// Per bridge: messages its remote broker took (acknowledged, or sent at QoS 0).
    bridge_messages_out: BridgeCounters,
    /// Per bridge: messages it dropped (QoS 0 while the remote broker is away, no rule maps
    /// them, or a broker refused them).
    bridge_messages_dropped: BridgeCounters,
    /// Per bridge: connection attempts after its first.
    bridge_reconnects: BridgeCounters,
    /// Per bridge: messages its session holds for the remote broker (queued, and taken but
    /// not yet acknowledged by the remote broker), as of the last scrape.
    bridge_queued: BridgeGauges,
    /// Members of the cluster's Raft membership as this node knows it, voters and learners
    /// (0 without `[cluster]`).
    cluster_members: Gauge,
    /// Voters of the cluster's membership.
    cluster_voters: Gauge,
    /// 1 while this node is the cluster's leader.
    cluster_is_leader: Gauge,
    /// 1 while this node knows a leader (0: an election is under way, or no quorum).
    cluster_has_leader: Gauge,
    /// 1 while this node's leader confirms a quorum.
    cluster_in_quorum: Gauge,
    /// The Raft term this node is in.
    cluster_term: Gauge,
    /// The index of the last entry in this node's Raft log.
    cluster_last_log_index: Gauge,
    /// The index of the last entry this node applied to its cluster state.
    cluster_last_applied: Gauge,
    /// Entries in this node's log not yet applied (last log index - last applied).
    cluster_apply_lag: Gauge,
    /// Times the leader this node knows changed (to another node, or to none).
    cluster_leader_changes: Counter,
    /// On the leader, per member (label `node`): entries of the leader's log it has not
    /// acknowledged yet.
    cluster_replication_lag: ClusterLag,
    /// Messages forwarded to other cluster nodes (for their clean sessions' subscribers).
    cluster_forwarded_out: Counter,
    /// Messages other cluster nodes forwarded here.
    cluster_forwarded_in: Counter,
    /// Messages for other cluster nodes dropped: a full queue, or a link down.
    cluster_forward_dropped: Counter,
    /// Per cluster node (label `node`, this one included): its routes as this node holds
    /// them, as of the last scrape.
    cluster_routes: ClusterLag,
    /// Per other cluster node (label `node`): 1 while this node's forwarding link to it is up.
    cluster_forward_link_up: ClusterLag,
    /// Per other cluster node (label `node`): messages queued for it now.
    cluster_forward_queued: ClusterLag,
}

/// What `cluster.rs` sets: clones of the cluster's gauges (each shares its value with the
/// registered one).
#[derive(Debug, Clone)]
pub(crate) struct ClusterMetrics {
    pub(crate) members: Gauge,
    pub(crate) voters: Gauge,
    pub(crate) is_leader: Gauge,
    pub(crate) has_leader: Gauge,
    pub(crate) in_quorum: Gauge,
    pub(crate) term: Gauge,
    pub(crate) last_log_index: Gauge,
    pub(crate) last_applied: Gauge,
    pub(crate) apply_lag: Gauge,
    pub(crate) leader_changes: Counter,
    pub(crate) replication_lag: ClusterLag,
}

/// Gauges labelled by `node` (a cluster node id).
pub(crate) type ClusterLag = Family<[(&'static str, String); 1], Gauge>;

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mqttd");
        macro_rules! register {
            ($($name:ident: $kind:ty = $help:literal $(=> $new:expr)?,)*) => {{
                $(let $name: $kind = register!(@new $kind $(, $new)?);
                registry.register(stringify!($name), $help, $name.clone());)*
                Self { registry, $($name,)* }
            }};
            (@new $kind:ty) => { <$kind>::default() };
            (@new $kind:ty, $new:expr) => { $new };
        }
        let metrics = register! {
            connections_accepted: Counter = "Connections accepted by the listeners",
            connections_refused: Counter = "Connections refused by connection limits",
            connections_open: Gauge = "Connections open now",
            connections_parked: Gauge = "Idle TCP connections parked now, without a task of their own",
            clients_connected: Gauge = "Clients connected now",
            clients_by_transport: ByTransport = "Clients connected now, by transport",
            messages_received: Counter = "PUBLISH packets received",
            messages_sent: Counter = "PUBLISH packets sent",
            routed: Counter = "Deliveries handed to sessions",
            messages_dropped: Counter = "Messages dropped",
            bytes_received: Counter = "Bytes received",
            bytes_sent: Counter = "Bytes sent",
            wills: Counter = "Will messages published",
            takeovers: Counter = "Sessions taken over",
            protocol_errors: Counter = "Connections closed for protocol errors",
            auth_failures: Counter = "Failed authentications",
            tls_handshake_failures: Counter = "TLS handshakes that failed",
            tls_handshake_timeouts: Counter = "TLS handshakes not done within connect_timeout",
            quic_connections: Gauge = "QUIC connections open now",
            quic_handshakes: Counter = "QUIC handshakes that reached MQTT",
            quic_handshake_failures: Counter = "QUIC handshakes that failed or timed out",
            quic_retries: Counter = "QUIC stateless Retries sent",
            quic_sent_packets: Counter = "QUIC packets sent",
            quic_sent_bytes: Counter = "Bytes of the QUIC packets sent, ACK-only packets not counted",
            quic_lost_packets: Counter = "QUIC packets declared lost, ACK-only and MTU probes included",
            quic_lost_bytes: Counter = "Bytes of the lost QUIC packets that carried more than ACKs",
            quic_lost_mtu_probes: Counter = "Lost QUIC packets that were MTU probes",
            quic_congestion_events: Counter = "QUIC congestion window reductions",
            quic_path_challenges: Counter = "QUIC PATH_CHALLENGE frames sent",
            quic_path_changes: Counter = "QUIC client address changes noticed",
            quic_rtt_seconds: Histogram = "Smoothed RTT of QUIC connections, seen every stats_interval"
                => Histogram::new(RTT_BUCKETS),
            quic_stream_resets: Counter = "QUIC data streams reset for a malformed packet",
            sessions: Gauge = "Sessions held",
            subscriptions: Gauge = "Subscriptions held",
            retained_messages: Gauge = "Retained messages held",
            retained_bytes: Gauge = "Bytes of the retained messages held",
            persistent_sessions: Gauge = "Persistent sessions held, connected or not",
            limit_refusals: LimitRefusals =
                "Requests refused by a configured limit, by limit (subscriptions, retained_messages, retained_bytes, sessions)",
            session_timers: Gauge = "Timer tasks of offline sessions running",
            quic_socket_recv_buffer_bytes: Gauge = "QUIC UDP socket receive buffer in bytes",
            quic_socket_send_buffer_bytes: Gauge = "QUIC UDP socket send buffer in bytes",
            quic_datagrams_dropped: QuicDropped =
                "QUIC datagrams dropped by the listener's guard, by reason",
            store_errors: crate::storage::ErrorCounters =
                "Failed operations of the durable store, by operation (write, sync, open)",
            bridge_up: BridgeGauges = "Whether each bridge is connected to its remote broker",
            bridge_messages_in: BridgeCounters = "Messages each bridge published here from its remote broker",
            bridge_messages_out: BridgeCounters = "Messages each bridge's remote broker took",
            bridge_messages_dropped: BridgeCounters = "Messages each bridge dropped",
            bridge_reconnects: BridgeCounters = "Connection attempts of each bridge after its first",
            bridge_queued: BridgeGauges = "Messages each bridge's session holds for its remote broker",
            p2p_connections: P2pAccepted =
                "Peer-to-peer connections accepted, by path at connect (direct, relayed)",
            p2p_connections_open: Gauge = "Peer-to-peer MQTT connections open now",
            p2p_refused: Counter = "Peer-to-peer connections refused by p2p.allow",
            p2p_handshake_failures: Counter = "Peer-to-peer handshakes that failed or timed out",
            p2p_pings: Counter = "Pings the peer-to-peer listener answered",
            p2p_traversal_attempts: P2pByNat =
                "Peer-to-peer connection attempts admitted, by the node's NAT type",
            p2p_traversals: P2pOutcomes =
                "Peer-to-peer connection attempts by NAT type and outcome (direct, relay_only, failed, refused)",
            p2p_first_byte_seconds: Histogram =
                "Time from a peer-to-peer MQTT connection's first packet to its first stream byte"
                => Histogram::new(TRAVERSAL_BUCKETS),
            p2p_direct_path_seconds: Histogram =
                "Time from a peer-to-peer connection's first packet to a direct path carrying its data"
                => Histogram::new(TRAVERSAL_BUCKETS),
            p2p_path_bytes: P2pBytes =
                "Bytes peer-to-peer connections carried, by path (direct, relay) and direction",
            p2p_nat_type: P2pNatGauge = "The peer-to-peer node's NAT type now (1 for the detected one)",
            p2p_relay_up: P2pRelayGauges =
                "Whether each relay is the peer-to-peer node's home relay and connected",
            p2p_relay_latency_seconds: P2pRelayLatency =
                "Round-trip time to each relay in the node's last net report",
            cluster_members: Gauge = "Members of the cluster (voters and learners) as this node knows them",
            cluster_voters: Gauge = "Voters of the cluster as this node knows them",
            cluster_is_leader: Gauge = "1 while this node is the cluster's leader",
            cluster_has_leader: Gauge = "1 while this node knows a cluster leader",
            cluster_in_quorum: Gauge =
                "1 while this node's leader confirms that a majority of the voters follows it",
            cluster_term: Gauge = "The Raft term of this node",
            cluster_last_log_index: Gauge = "The index of the last entry of this node's Raft log",
            cluster_last_applied: Gauge = "The index of the last Raft entry this node applied",
            cluster_apply_lag: Gauge = "Entries of this node's Raft log not yet applied",
            cluster_leader_changes: Counter = "Changes of the cluster leader this node knows",
            cluster_forwarded_out: Counter = "Messages forwarded to other cluster nodes",
            cluster_forwarded_in: Counter = "Messages other cluster nodes forwarded here",
            cluster_forward_dropped: Counter =
                "Messages for other cluster nodes dropped (a full queue, a link down)",
            cluster_routes: ClusterLag = "Routes of each cluster node as this node holds them",
            cluster_forward_link_up: ClusterLag =
                "Whether this node's forwarding link to each other cluster node is up",
            cluster_forward_queued: ClusterLag = "Messages queued now for each other cluster node",
            cluster_replication_lag: ClusterLag =
                "On the leader: entries each member has not acknowledged yet, by node",
        };
        // Shown as 0 before anyone connects.
        for transport in TRANSPORTS {
            let _ = metrics
                .clients_by_transport
                .get_or_create(&[("transport", transport.as_str())]);
        }
        // Shown as 0 before anything is refused.
        for limit in LIMITS {
            let _ = metrics.limit_refusals.get_or_create(&[("limit", limit)]);
        }
        metrics
    }
}

/// `mqttd_clients_by_transport`, labelled by `transport`.
type ByTransport = Family<[(&'static str, &'static str); 1], Gauge>;
/// Every transport, in the order figures list them.
const TRANSPORTS: [Transport; 7] = [
    Transport::Tcp,
    Transport::Tls,
    Transport::WebSocket,
    Transport::WebSocketTls,
    Transport::Quic,
    Transport::P2p,
    Transport::Bridge,
];
/// `mqttd_limit_refusals_total`, labelled by `limit`.
type LimitRefusals = Family<[(&'static str, &'static str); 1], Counter>;
/// `mqttd_quic_datagrams_dropped_total`, labelled by `reason`.
type QuicDropped = Family<[(&'static str, &'static str); 1], Counter>;
/// Gauges labelled by `bridge`.
type BridgeGauges = Family<[(&'static str, String); 1], Gauge>;
/// Counters labelled by `bridge`.
type BridgeCounters = Family<[(&'static str, String); 1], Counter>;

/// One bridge's metrics: handles into the families of [`Metrics`].
#[derive(Debug, Clone)]
pub(crate) struct BridgeMetrics {
    pub(crate) up: Gauge,
    pub(crate) messages_in: Counter,
    pub(crate) messages_out: Counter,
    pub(crate) messages_dropped: Counter,
    pub(crate) reconnects: Counter,
    pub(crate) queued: Gauge,
}
/// `mqttd_p2p_connections_total`, labelled by `path`.
type P2pAccepted = Family<[(&'static str, &'static str); 1], Counter>;
/// Counters labelled by `nat`.
type P2pByNat = Family<[(&'static str, &'static str); 1], Counter>;
/// Counters labelled by `nat` and `outcome`.
type P2pOutcomes = Family<[(&'static str, &'static str); 2], Counter>;
/// Counters labelled by `path` and `direction`.
type P2pBytes = Family<[(&'static str, &'static str); 2], Counter>;
/// Gauges labelled by `nat`.
type P2pNatGauge = Family<[(&'static str, &'static str); 1], Gauge>;
/// Gauges labelled by `relay`.
type P2pRelayGauges = Family<[(&'static str, String); 1], Gauge>;
/// Gauges in seconds labelled by `relay`.
type P2pRelayLatency = Family<[(&'static str, String); 1], Gauge<f64, AtomicU64>>;
/// The buckets of the peer-to-peer times (first byte, direct path), in seconds: from
/// loopback to iroh's second and third hole-punching rounds (every 5 s).
const TRAVERSAL_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 30.0,
];
/// The `limit` labels of `mqttd_limit_refusals_total`.
const LIMITS: [&str; 4] = [
    "subscriptions",
    "retained_messages",
    "retained_bytes",
    "sessions",
];
/// The buckets of `quic_rtt_seconds`: from loopback to a satellite link, in seconds.
const RTT_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

impl Metrics {
    /// The gauge of clients connected over `transport` (moved with `clients_connected`).
    pub(crate) fn clients_over(&self, transport: Transport) -> Gauge {
        self.clients_by_transport
            .get_or_create_owned(&[("transport", transport.as_str())])
    }

    /// Clients connected now over each transport (`tcp`, `tls`, `ws`, `wss`, `quic`, `p2p`,
    /// `bridge`), every transport listed.
    pub fn clients_by_transport(&self) -> Vec<(&'static str, i64)> {
        TRANSPORTS
            .iter()
            .map(|t| (t.as_str(), self.clients_over(*t).get()))
            .collect()
    }

    /// The counter of QUIC datagrams dropped for `reason` (`short_unknown_version`: a long
    /// header of an unknown version under 1200 bytes, not answered; `amplification`: not sent
    /// to an address not yet validated, past three times what it sent; `tracking_full`: an
    /// Initial not taken while too many addresses wait for validation). Created at once, so
    /// that the metric shows 0 before anything is dropped.
    pub(crate) fn quic_datagrams_dropped(&self, reason: &'static str) -> Counter {
        self.quic_datagrams_dropped
            .get_or_create_owned(&[("reason", reason)])
    }

    /// Counts `n` requests refused by the limit `limit`: `subscriptions` (a SUBSCRIBE filter
    /// past `max_subscriptions`), `retained_messages` and `retained_bytes` (a retained message
    /// not stored past `max_retained_messages` or `max_retained_bytes`), `sessions` (a
    /// CONNECT refused past `max_sessions`).
    pub(crate) fn limit_refused(&self, limit: &'static str, n: u64) {
        if n > 0 {
            self.limit_refusals
                .get_or_create(&[("limit", limit)])
                .inc_by(n);
        }
    }

    /// The metrics of the bridge named `name`, created at once so that they show 0 before
    /// anything happens.
    pub(crate) fn bridge(&self, name: &str) -> BridgeMetrics {
        let label = [("bridge", name.to_owned())];
        BridgeMetrics {
            up: self.bridge_up.get_or_create_owned(&label),
            messages_in: self.bridge_messages_in.get_or_create_owned(&label),
            messages_out: self.bridge_messages_out.get_or_create_owned(&label),
            messages_dropped: self.bridge_messages_dropped.get_or_create_owned(&label),
            reconnects: self.bridge_reconnects.get_or_create_owned(&label),
            queued: self.bridge_queued.get_or_create_owned(&label),
        }
    }

    /// Sets the forwarding metrics from the router's counters (at a scrape): the counters
    /// follow the router's own, which only grow.
    pub(crate) fn set_forwarding(&self, stats: &mqttd_cluster::router::RouterStats, own: u64) {
        let follow = |c: &Counter, v: u64| c.inc_by(v.saturating_sub(c.get()));
        follow(&self.cluster_forwarded_out, stats.forwarded_out);
        follow(&self.cluster_forwarded_in, stats.forwarded_in);
        follow(&self.cluster_forward_dropped, stats.dropped);
        let gauge = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        for (node, n) in &stats.nodes {
            let label = [("node", node.to_string())];
            self.cluster_routes
                .get_or_create(&label)
                .set(gauge(n.routes));
            if *node != own {
                self.cluster_forward_link_up
                    .get_or_create(&label)
                    .set(i64::from(n.link_up));
                self.cluster_forward_queued
                    .get_or_create(&label)
                    .set(gauge(n.queued));
            }
        }
    }

    /// The cluster's gauges, for the task that follows Raft's metrics.
    pub(crate) fn cluster(&self) -> ClusterMetrics {
        ClusterMetrics {
            members: self.cluster_members.clone(),
            voters: self.cluster_voters.clone(),
            is_leader: self.cluster_is_leader.clone(),
            has_leader: self.cluster_has_leader.clone(),
            in_quorum: self.cluster_in_quorum.clone(),
            term: self.cluster_term.clone(),
            last_log_index: self.cluster_last_log_index.clone(),
            last_applied: self.cluster_last_applied.clone(),
            apply_lag: self.cluster_apply_lag.clone(),
            leader_changes: self.cluster_leader_changes.clone(),
            replication_lag: self.cluster_replication_lag.clone(),
        }
    }

    /// The counter of `p2p://` connections accepted over a `direct` or `relayed` path (the
    /// path of their first packet: a relayed connection may move to a direct path later).
    pub(crate) fn p2p_connections(&self, path: &'static str) -> Counter {
        self.p2p_connections.get_or_create_owned(&[("path", path)])
    }

    /// The counter of `p2p://` connection attempts while the node's NAT type is `nat`.
    pub(crate) fn p2p_traversal_attempt(&self, nat: &'static str) -> Counter {
        self.p2p_traversal_attempts
            .get_or_create_owned(&[("nat", nat)])
    }

    /// The counter of `p2p://` attempts made while the node's NAT type was `nat` that ended
    /// with `outcome` (`direct`, `relay_only`, `failed`, `refused`).
    pub(crate) fn p2p_traversal(&self, nat: &'static str, outcome: &'static str) -> Counter {
        self.p2p_traversals
            .get_or_create_owned(&[("nat", nat), ("outcome", outcome)])
    }

    /// The counter of bytes `p2p://` connections carried over `path` (`direct`, `relay`)
    /// in `direction` (`sent`, `received`).
    pub(crate) fn p2p_path_bytes(&self, path: &'static str, direction: &'static str) -> Counter {
        self.p2p_path_bytes
            .get_or_create_owned(&[("path", path), ("direction", direction)])
    }

    /// Sets the NAT type gauge: 1 for `nat` among `all`, 0 for the others.
    pub(crate) fn p2p_set_nat_type(&self, nat: &'static str, all: &[&'static str]) {
        for &t in all {
            self.p2p_nat_type
                .get_or_create_owned(&[("nat", t)])
                .set(i64::from(t == nat));
        }
    }

    /// Sets relay `url`'s gauges: up or not, and its latency (0 if unknown).
    pub(crate) fn p2p_set_relay(&self, url: &str, up: bool, latency: Option<f64>) {
        let label = [("relay", url.to_owned())];
        self.p2p_relay_up
            .get_or_create_owned(&label)
            .set(i64::from(up));
        self.p2p_relay_latency_seconds
            .get_or_create_owned(&label)
            .set(latency.unwrap_or(0.0));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.messages_received.inc_by(3);
        m.clients_connected.set(2);
        let text = m.render();
        assert!(text.contains("mqttd_messages_received_total 3"), "{text}");
        assert!(text.contains("mqttd_clients_connected 2"), "{text}");
        assert!(text.contains("# EOF"));
    }

    #[test]
    fn the_rtt_histogram_has_seconds_buckets() {
        let m = Metrics::default();
        m.quic_rtt_seconds.observe(0.003);
        let text = m.render();
        assert!(text.contains("mqttd_quic_rtt_seconds_count 1"), "{text}");
        assert!(
            text.contains("mqttd_quic_rtt_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mqttd_quic_rtt_seconds_bucket{le=\"0.0025\"} 0"),
            "{text}"
        );
    }
}
