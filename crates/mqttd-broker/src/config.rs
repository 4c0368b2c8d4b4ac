//! Broker settings, read from TOML. Where a setting means what a Mosquitto setting means, it has
//! Mosquitto's name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mqttd_proto::server::ServerConfig;
use mqttd_proto::session::{QueueLimits, NEVER_EXPIRES};
use mqttd_proto::QoS;
use serde::{Deserialize, Serialize};

use crate::bridge::Bridge;
use crate::storage::Durability;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is invalid or has an unknown key.
    #[error("invalid configuration in {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A listener URL is not understood.
    #[error("invalid listener {url:?}: {reason}")]
    Listener {
        /// The URL.
        url: String,
        /// Why.
        reason: &'static str,
    },
}

/// A listener's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenerKind {
    /// MQTT over TCP (`tcp://` or `mqtt://`).
    Tcp,
    /// MQTT over TLS (`tls://`, `mqtts://` or `ssl://`), with the certificates of [`TlsConfig`].
    Tls,
    /// MQTT over WebSocket (`ws://`), on the listener's path (`/mqtt` unless the URL names one).
    Ws,
    /// MQTT over WebSocket over TLS (`wss://`).
    Wss,
    /// MQTT over QUIC (`quic://`, UDP), single- or multi-stream as EMQX has it, with the
    /// certificates of [`TlsConfig`] and the settings of [`QuicConfig`].
    Quic,
    /// The HTTP endpoint for metrics, health and administration (`http://`).
    Http,
    /// A peer-to-peer relay for mqttd nodes (`relay://`): HTTPS on TCP and QUIC address
    /// discovery on UDP, same port, with the certificates of [`TlsConfig`] and the admission
    /// rules of [`RelayConfig`]. Needs the `p2p` feature.
    Relay,
    /// MQTT over peer-to-peer node connections (`p2p://`, or `p2p://HOST:PORT` for the UDP
    /// address to bind): the broker's node, `<data_dir>/node.key`, accepts connections for
    /// ALPN `mqtt` from peers dialing its node id, directly or through the relays of
    /// [`P2pConfig`], single- or multi-stream as over QUIC. Needs the `p2p` feature.
    P2p,
}

impl ListenerKind {
    /// Whether this kind carries MQTT (every kind but the HTTP endpoint and the relay).
    pub fn is_mqtt(self) -> bool {
        !matches!(self, Self::Http | Self::Relay)
    }

    /// Whether this kind needs the TLS certificates.
    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Tls | Self::Wss | Self::Quic | Self::Relay)
    }
}

/// Where and how to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Listener {
    /// Protocol.
    pub kind: ListenerKind,
    /// Address to bind.
    pub addr: SocketAddr,
    /// The URL as written, used as the listener's name in logs and hooks.
    pub url: String,
    /// The HTTP path WebSocket clients connect to (`/mqtt` by default); `None` for other kinds.
    pub path: Option<String>,
    /// Expect a PROXY protocol (v1 or v2) header before anything else on each connection and
    /// take the client's address from it (`?proxy_protocol=true`; TCP, TLS, WS and WSS
    /// listeners; on WSS the header comes before TLS).
    pub proxy_protocol: bool,
    /// Take the client's address from the upgrade request's `Forwarded` (RFC 7239) or
    /// `X-Forwarded-For` header (`?trust_proxy=true`; WebSocket listeners behind a reverse
    /// proxy). It wins over a PROXY header's address, being nearer the client.
    pub trust_proxy: bool,
}

impl Listener {
    /// Parses `SCHEME://HOST:PORT[/PATH][?OPTION=true&...]`: schemes `tcp`/`mqtt`,
    /// `tls`/`mqtts`/`ssl`, `ws`, `wss`, `quic`, `http`, `relay` and `p2p`; options
    /// `proxy_protocol` (TCP, TLS, WS, WSS) and `trust_proxy` (WS, WSS); a path only for WS
    /// and WSS. `p2p://` may name no address: its node then binds `p2p.bind` (by default
    /// every interface, on a port the system picks), as `p2p://0.0.0.0:0` does.
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let err = |reason| ConfigError::Listener {
            url: url.to_owned(),
            reason,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| err("expected SCHEME://HOST:PORT"))?;
        let kind =
            match scheme {
                "tcp" | "mqtt" => ListenerKind::Tcp,
                "tls" | "mqtts" | "ssl" => ListenerKind::Tls,
                "ws" => ListenerKind::Ws,
                "wss" => ListenerKind::Wss,
                "quic" => ListenerKind::Quic,
                "http" => ListenerKind::Http,
                "relay" => ListenerKind::Relay,
                "p2p" => ListenerKind::P2p,
                _ => return Err(err(
                    "unsupported scheme (tcp, mqtt, tls, mqtts, ws, wss, quic, http, relay, p2p)",
                )),
            };
        let rest = match (kind, rest) {
            (ListenerKind::P2p, "") => "0.0.0.0:0",
            _ => rest,
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (host_port, path) = match rest.split_once('/') {
            Some((hp, p)) => (hp, Some(format!("/{}", p.trim_end_matches('/')))),
            None => (rest, None),
        };
        let path = path.filter(|p| p != "/");
        let websocket = matches!(kind, ListenerKind::Ws | ListenerKind::Wss);
        if path.is_some() && !websocket {
            return Err(err("only ws:// and wss:// listeners have a path"));
        }
        let path = websocket.then(|| path.unwrap_or_else(|| "/mqtt".to_owned()));
        let mut proxy_protocol = false;
        let mut trust_proxy = false;
        for option in query.split('&').filter(|o| !o.is_empty()) {
            let (key, value) = option.split_once('=').unwrap_or((option, "true"));
            let value = match value {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => return Err(err("listener options take true or false")),
            };
            match key {
                "proxy_protocol"
                    if matches!(
                        kind,
                        ListenerKind::Tcp
                            | ListenerKind::Tls
                            | ListenerKind::Ws
                            | ListenerKind::Wss
                    ) =>
                {
                    proxy_protocol = value;
                }
                "trust_proxy" if websocket => trust_proxy = value,
                "proxy_protocol" => {
                    return Err(err(
                        "proxy_protocol is for tcp://, tls://, ws:// and wss://",
                    ))
                }
                "trust_proxy" => return Err(err("trust_proxy is for ws:// and wss://")),
                _ => return Err(err("unknown listener option (proxy_protocol, trust_proxy)")),
            }
        }
        let addr = host_port
            .parse()
            .or_else(|_| host_port.replace("localhost", "127.0.0.1").parse())
            .map_err(|_| err("expected an IP address and port"))?;
        Ok(Self {
            kind,
            addr,
            url: url.to_owned(),
            path,
            proxy_protocol,
            trust_proxy,
        })
    }

    /// Whether only this machine can reach the listener. Never for `p2p://`: peers reach it
    /// through relays whatever address it binds.
    pub fn is_loopback(&self) -> bool {
        self.kind != ListenerKind::P2p && self.addr.ip().is_loopback()
    }
}

/// The certificates of the TLS-based listeners (TLS, WSS and QUIC): the
/// `[tls]` table. Without `cert_file`, the broker generates a local CA and a server
/// certificate under `<data_dir>/tls/` on first start and uses those.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TlsConfig {
    /// PEM certificate chain, the server's certificate first (Mosquitto's `certfile`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of that certificate (`keyfile`).
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates that client certificates are verified against (`cafile`); when
    /// set, clients may present a certificate.
    pub ca_file: Option<PathBuf>,
    /// Refuse clients without a valid certificate (`require_certificate`); needs `ca_file`.
    pub require_client_cert: bool,
    /// Use the client certificate's subject CN (else its first DNS or e-mail SAN) as the user
    /// name, which the ACL then applies to (`use_identity_as_username`).
    pub use_identity_as_username: bool,
    /// Further certificates chosen by the name the client asks for (SNI).
    pub sni: Vec<SniCertificate>,
    /// Host names to put in the generated server certificate besides `localhost`,
    /// `127.0.0.1` and `::1`.
    pub hostnames: Vec<String>,
}

/// A certificate served to clients that ask for `host` by SNI.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SniCertificate {
    /// The host name (exact match).
    pub host: String,
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
}

/// The QUIC listeners' transport settings: the `[quic]` table. Where a setting means what an
/// EMQX QUIC listener setting means, it has EMQX's name. Durations are in seconds unless the
/// name says `_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct QuicConfig {
    /// Seconds without any packet after which QUIC closes the connection; 0 (the default)
    /// means 1.5 times the longest MQTT keep alive the broker allows (`max_keepalive`, or
    /// 65,535 s without a limit), so that the MQTT keep alive, not QUIC, decides when an idle
    /// client is gone. The client's own idle timeout applies too: QUIC uses the smaller.
    pub idle_timeout: u64,
    /// Seconds between QUIC PINGs the broker sends on an idle connection; 0 (the default) for
    /// none: MQTT's PINGREQ keeps a connection alive.
    pub keep_alive_interval: u64,
    /// Seconds the QUIC handshake may take; it is cut at `connect_timeout` in any case.
    pub handshake_idle_timeout: u64,
    /// Bidirectional streams a client may have open at once: the control stream and its data
    /// streams. Clients may open no unidirectional streams.
    pub peer_bidi_stream_count: u32,
    /// The RTT assumed before one is measured, in milliseconds.
    pub initial_rtt_ms: u64,
    /// The congestion controller.
    pub congestion_control: CongestionControl,
    /// Bytes a client may send on one stream ahead of the broker reading them.
    pub stream_recv_window_default: u32,
    /// Bytes a client may send on all streams of a connection ahead of the broker reading them.
    pub conn_flow_control_window: u32,
    /// Handshakes in progress above which a client whose address is not yet validated is sent
    /// a stateless Retry first (which costs it a round trip and the broker no state); 0 to
    /// always Retry.
    pub retry_above_handshakes: usize,
    /// Serve HTTP/3 on the QUIC listeners' ports besides MQTT (ALPN `h3` next to `mqtt`):
    /// `GET /health` and `GET /metrics`, the HTTP endpoint's pages, public like them. Each
    /// client may then open the three unidirectional streams HTTP/3 needs.
    pub http3: bool,
    /// Bytes of receive buffer the QUIC listeners' UDP sockets ask for; 0 for the kernel's
    /// default. The kernel caps it at `net.core.rmem_max` unless the broker has
    /// CAP_NET_ADMIN; the broker warns once if it gets less.
    pub socket_recv_buffer: usize,
    /// Bytes of send buffer the QUIC listeners' UDP sockets ask for; 0 for the kernel's
    /// default. Capped at `net.core.wmem_max` likewise.
    pub socket_send_buffer: usize,
    /// Seconds between looks at each connection's QUIC statistics, whose growth is then added
    /// to the `mqttd_quic_*` counters of `/metrics` (and its RTT observed); 0 to look only at
    /// disconnect. A change of the client's address is noticed at these looks too.
    pub stats_interval: u64,
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            idle_timeout: 0,
            keep_alive_interval: 0,
            handshake_idle_timeout: 10,
            peer_bidi_stream_count: 16,
            initial_rtt_ms: 333,
            congestion_control: CongestionControl::Cubic,
            stream_recv_window_default: 256 * 1024,
            conn_flow_control_window: 2 * 1024 * 1024,
            retry_above_handshakes: 256,
            http3: true,
            socket_recv_buffer: 4 * 1024 * 1024,
            socket_send_buffer: 2 * 1024 * 1024,
            stats_interval: 10,
        }
    }
}

/// The `relay://` listeners' admission rules: the `[relay]` table. A relay forwards encrypted
/// packets between the mqttd nodes connected to it and tells each the address it sees it at
/// (QUIC address discovery); it reads nothing it forwards.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Node ids (64 hex digits, as `mqttd id` prints them) allowed to use the relay. Nobody
    /// else may, unless `allow_any` is set.
    pub allow: Vec<String>,
    /// Admit any node (an open relay: its bandwidth is anyone's).
    pub allow_any: bool,
    /// Nodes connected at once; 0 for no limit.
    pub max_clients: usize,
    /// Bytes per second each node may send through the relay; 0 for no limit.
    pub client_rate: u32,
    /// Bytes a node may send at once above `client_rate`; 0 for iroh-relay's default.
    pub client_burst: u32,
    /// Serve QUIC address discovery on UDP, same port as HTTPS.
    pub quic_discovery: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            allow_any: false,
            max_clients: 1024,
            client_rate: 0,
            client_burst: 0,
            quic_discovery: true,
        }
    }
}

/// The `p2p://` listener's node: the `[p2p]` table. The node's identity is
/// `<data_dir>/node.key` (`mqttd id` prints its id, which peers dial).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct P2pConfig {
    /// Relay URLs (`https://HOST:PORT`) the node stays connected to, so that peers that cannot
    /// reach it directly reach it through them: at home on one (the one that answers best),
    /// moving to another when it is lost; peers dial through all of them. Empty: the broker's
    /// own `relay://` listener if it has one, else none (direct connections only).
    pub relays: Vec<String>,
    /// PEM CA certificates the relays' certificates are checked against, besides the
    /// compiled-in Mozilla roots and, for the broker's own relay, its generated CA.
    pub relay_cafile: Option<PathBuf>,
    /// UDP addresses the node binds for direct paths when the listener URL names none
    /// (`p2p://`); empty: every interface (IPv4 and IPv6), on a port the system picks.
    pub bind: Vec<SocketAddr>,
    /// Node ids (64 hex digits) that may connect; empty: any node. Others are refused after
    /// the handshake, with QUIC application error 0x87 (not authorized).
    pub allow: Vec<String>,
    /// Use the peer's node id (64 hex digits) as the client's user name, which the ACL then
    /// applies to, as `tls.use_identity_as_username` does with a client certificate: the
    /// node's key is the credential, and the CONNECT's user name and password are ignored.
    pub use_node_id_as_username: bool,
}

/// A QUIC congestion controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum CongestionControl {
    /// CUBIC (RFC 9438), the default.
    #[default]
    Cubic,
    /// NewReno (RFC 9002).
    NewReno,
}

/// What happens to a QoS 0 message for a client that is offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OfflineQos0 {
    /// Dropped (Mosquitto's default, `queue_qos0_messages false`).
    #[default]
    Drop,
    /// Queued like QoS 1 and 2 messages.
    Queue,
}

/// Default `max_subscriptions`: far more than any device or application subscribes to
/// (gateways and bridges included), while one client's filters stay a few MiB of the trie.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 10_000;
/// Default `max_retained_messages`: a retained status topic for each of a million devices.
pub const DEFAULT_MAX_RETAINED_MESSAGES: usize = 1_000_000;
/// Default `max_retained_bytes` (1 GiB): bounds what the retained store holds whatever the
/// message sizes, so that a publisher of large retained payloads meets a limit too.
pub const DEFAULT_MAX_RETAINED_BYTES: usize = 1 << 30;
/// Default `max_sessions`: persistent sessions, connected or not; a client that creates them
/// under ever new identifiers and abandons them meets it long before the broker's memory does.
pub const DEFAULT_MAX_SESSIONS: usize = 100_000;
/// Default `max_session_expiry`: 7 days. A session asking never to expire (MQTT 5 0xFFFFFFFF,
/// or a 3.1.1 clean session 0) is kept this long offline, so an abandoned one is reclaimed.
pub const DEFAULT_MAX_SESSION_EXPIRY: u32 = 7 * 24 * 3600;

/// The broker's settings. Every field has a default; the README documents each key.
///
/// Settings will be added, so other crates cannot build it field by field: start from
/// [`Config::default`] (or [`Config::parse`], [`Config::load`]) and assign the fields to
/// change.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Listener URLs (`tcp://127.0.0.1:1883`, `tls://127.0.0.1:8883`, `ws://127.0.0.1:8083`,
    /// `wss://127.0.0.1:8084`, `http://127.0.0.1:8081`).
    pub listen: Vec<String>,
    /// Certificates of the TLS-based listeners.
    pub tls: TlsConfig,
    /// Transport settings of the QUIC listeners.
    pub quic: QuicConfig,
    /// Admission rules of the relay listeners.
    pub relay: RelayConfig,
    /// The peer-to-peer listener's node.
    pub p2p: P2pConfig,
    /// Directory for persistent data.
    pub data_dir: PathBuf,
    /// Allow clients without a user name. Unset: allowed only when every MQTT listener is on
    /// a loopback address and no password file is set (Mosquitto 2's local-only default).
    pub allow_anonymous: Option<bool>,
    /// Password file (`mqttd passwd`).
    pub password_file: Option<PathBuf>,
    /// ACL file in Mosquitto's syntax.
    pub acl_file: Option<PathBuf>,
    /// Largest keep alive in seconds; 0 for no limit.
    pub max_keepalive: u16,
    /// Messages queued per session beyond those in flight.
    pub max_queued_messages: usize,
    /// Bytes queued per session; 0 for no limit.
    pub max_queued_bytes: usize,
    /// QoS 1 and 2 messages in flight towards each client.
    pub max_inflight_messages: u16,
    /// Largest packet accepted, in bytes.
    pub max_packet_size: u32,
    /// QoS 1 and 2 messages a client may have unacknowledged towards the broker.
    pub receive_maximum: u16,
    /// Topic aliases a client may use towards the broker.
    pub topic_alias_maximum: u16,
    /// Highest QoS the broker accepts (0, 1 or 2).
    pub max_qos: u8,
    /// Whether retained messages are supported.
    pub retain_available: bool,
    /// Simultaneous client connections; 0 for no limit.
    pub max_connections: usize,
    /// New connections per second accepted from one IP address; 0 for no limit.
    pub max_connection_rate: u32,
    /// Seconds from connection to CONNECT (and CONNACK).
    pub connect_timeout: u64,
    /// Longest topic name or filter, in bytes.
    pub max_topic_length: usize,
    /// Most levels in a topic name or filter.
    pub max_topic_levels: usize,
    /// Most subscriptions one client may hold (SUBACK 0x97 beyond); 0 for no limit.
    pub max_subscriptions: usize,
    /// Most retained messages the broker holds (a new retained topic beyond is refused with
    /// PUBACK 0x97); 0 for no limit.
    pub max_retained_messages: usize,
    /// Most bytes of retained messages (topic, payload and properties) the broker holds;
    /// 0 for no limit.
    pub max_retained_bytes: usize,
    /// Most persistent sessions held, connected or not (a CONNECT that would create one more
    /// is refused with CONNACK 0x97, 3.1.1: 0x03); 0 for no limit.
    pub max_sessions: usize,
    /// Session expiry, in seconds, of 3.1.1 clients connecting with clean session 0; unset for
    /// `max_session_expiry` (Mosquitto's `persistent_client_expiration`).
    pub persistent_client_expiration: Option<u32>,
    /// Largest session expiry interval granted, in seconds, to MQTT 5 and 3.1.1 clients alike;
    /// `4294967295` (or unset) for no limit.
    pub max_session_expiry: Option<u32>,
    /// QoS 0 messages for offline clients.
    pub offline_qos0: OfflineQos0,
    /// Seconds between `$SYS` updates; 0 disables them (`sys_interval`).
    pub sys_interval: u64,
    /// Keep persistent sessions, their messages and retained messages in a store in
    /// `data_dir`, so that they survive a restart or a crash.
    pub persistence: bool,
    /// When an acknowledgement may leave: see [`Durability`].
    #[serde(serialize_with = "serialize_durability")]
    pub durability: Durability,
    /// Milliseconds: the longest `durability = "batch"` waits for an fsync, and
    /// `durability = "none"` for any write.
    pub sync_interval_ms: u64,
    /// The log's filter (`info`, `debug`, `info,mqttd_broker=debug`: tracing's `EnvFilter`
    /// syntax) when `RUST_LOG` is not set; the binary applies it at start and on reload.
    pub log_level: Option<String>,
    /// Bridges to other brokers (`[[bridge]]` tables), read into their types at load; two
    /// with one name are an error.
    #[serde(
        deserialize_with = "crate::bridge::config::unique_names",
        serialize_with = "crate::bridge::config::serialize_redacted"
    )]
    pub bridge: Vec<Bridge>,
    /// The `[cluster]` section: this node's Raft id, name, cluster listener, seeds and
    /// certificates (see `docs/cluster.md`). Unset: the broker runs alone.
    pub cluster: Option<mqttd_cluster::config::ClusterConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            tls: TlsConfig::default(),
            quic: QuicConfig::default(),
            relay: RelayConfig::default(),
            p2p: P2pConfig::default(),
            data_dir: PathBuf::from("mqttd-data"),
            allow_anonymous: None,
            password_file: None,
            acl_file: None,
            max_keepalive: 0,
            max_queued_messages: 1000,
            max_queued_bytes: 64 * 1024 * 1024,
            max_inflight_messages: 64,
            max_packet_size: 1024 * 1024,
            receive_maximum: 1024,
            topic_alias_maximum: 64,
            max_qos: 2,
            retain_available: true,
            max_connections: 0,
            max_connection_rate: 0,
            connect_timeout: 10,
            max_topic_length: 65_535,
            max_topic_levels: 128,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
            max_retained_messages: DEFAULT_MAX_RETAINED_MESSAGES,
            max_retained_bytes: DEFAULT_MAX_RETAINED_BYTES,
            max_sessions: DEFAULT_MAX_SESSIONS,
            persistent_client_expiration: None,
            max_session_expiry: Some(DEFAULT_MAX_SESSION_EXPIRY),
            offline_qos0: OfflineQos0::Drop,
            sys_interval: 10,
            persistence: true,
            durability: Durability::Sync,
            sync_interval_ms: 100,
            log_level: None,
            bridge: Vec::new(),
            cluster: None,
        }
    }
}

impl Config {
    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, Box<toml::de::Error>> {
        toml::from_str(text).map_err(Box::new)
    }

    /// The listeners, parsed.
    pub fn listeners(&self) -> Result<Vec<Listener>, ConfigError> {
        self.listen.iter().map(|u| Listener::parse(u)).collect()
    }

    /// Whether clients without credentials may connect: as configured, else only when every
    /// MQTT listener is on a loopback address and no password file is set.
    pub fn anonymous_allowed(&self) -> bool {
        self.allow_anonymous.unwrap_or_else(|| {
            self.password_file.is_none()
                && self
                    .listeners()
                    .map(|ls| {
                        ls.iter()
                            .filter(|l| l.kind.is_mqtt())
                            .all(Listener::is_loopback)
                    })
                    .unwrap_or(false)
        })
    }

    /// The protocol state machine's settings.
    pub fn server_config(&self) -> ServerConfig {
        ServerConfig {
            max_packet_size: self.max_packet_size,
            receive_maximum: self.receive_maximum.max(1),
            max_inflight_messages: self.max_inflight_messages.max(1),
            topic_alias_maximum: self.topic_alias_maximum,
            maximum_qos: QoS::from_bits(self.max_qos.min(2)).unwrap_or(QoS::ExactlyOnce),
            retain_available: self.retain_available,
            wildcard_subscription_available: true,
            subscription_identifiers_available: true,
            shared_subscription_available: true,
            max_keepalive: self.max_keepalive,
            max_session_expiry: self.max_session_expiry(),
            // A 3.1.1 client cannot be told its session expires: it gets the same cap.
            v3_session_expiry: self
                .persistent_client_expiration
                .unwrap_or(NEVER_EXPIRES)
                .min(self.max_session_expiry()),
            connect_timeout: Duration::from_secs(self.connect_timeout.max(1)),
        }
    }

    /// The largest session expiry interval granted, in seconds (`NEVER_EXPIRES` for no limit).
    pub fn max_session_expiry(&self) -> u32 {
        self.max_session_expiry.unwrap_or(NEVER_EXPIRES)
    }

    /// Per-session queue bounds.
    pub fn queue_limits(&self) -> QueueLimits {
        QueueLimits {
            max_messages: self.max_queued_messages,
            max_bytes: self.max_queued_bytes,
        }
    }
}

/// `durability` as written in the file (`Durability` lives in storage, which serializes nothing).
fn serialize_durability<S: serde::Serializer>(d: &Durability, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{d:?}").to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mosquitto_names_parse_and_unknown_keys_fail() {
        let c = Config::parse(
            "listen = ['tcp://0.0.0.0:1883']\nmax_keepalive = 60\nmax_queued_messages = 5\nallow_anonymous = true\n",
        )
        .unwrap();
        assert_eq!(c.max_keepalive, 60);
        assert_eq!(c.max_queued_messages, 5);
        assert!(c.anonymous_allowed());
        assert!(Config::parse("max_keepalvie = 60").is_err());
    }

    #[test]
    fn limits_have_defaults_and_bound_v3_session_expiry() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.max_subscriptions, 10_000);
        assert_eq!(c.max_retained_messages, 1_000_000);
        assert_eq!(c.max_retained_bytes, 1 << 30);
        assert_eq!(c.max_sessions, 100_000);
        let s = c.server_config();
        assert_eq!(s.max_session_expiry, 7 * 24 * 3600);
        assert_eq!(s.v3_session_expiry, 7 * 24 * 3600);
        let c = Config::parse(
            "max_session_expiry = 4294967295\nmax_sessions = 0\nmax_retained_bytes = 0\n",
        )
        .unwrap();
        assert_eq!(c.server_config().v3_session_expiry, NEVER_EXPIRES);
        assert_eq!((c.max_sessions, c.max_retained_bytes), (0, 0));
        let c = Config::parse("max_session_expiry = 60\npersistent_client_expiration = 3600\n")
            .unwrap();
        assert_eq!(c.server_config().v3_session_expiry, 60);
    }

    #[test]
    fn the_quic_table_has_emqx_names() {
        let c = Config::parse(
            "[quic]\nidle_timeout = 120\npeer_bidi_stream_count = 4\ncongestion_control = 'newreno'\n",
        )
        .unwrap();
        assert_eq!(c.quic.idle_timeout, 120);
        assert_eq!(c.quic.peer_bidi_stream_count, 4);
        assert_eq!(c.quic.congestion_control, CongestionControl::NewReno);
        assert_eq!(c.quic.retry_above_handshakes, 256);
        assert!(Config::parse("[quic]\ncongestion_control = 'bbr'").is_err());
        assert!(c.quic.http3);
        assert!(!Config::parse("[quic]\nhttp3 = false").unwrap().quic.http3);
        assert_eq!(c.quic.socket_recv_buffer, 4 << 20);
        assert_eq!(c.quic.socket_send_buffer, 2 << 20);
        let c =
            Config::parse("[quic]\nsocket_recv_buffer = 0\nsocket_send_buffer = 65536").unwrap();
        assert_eq!(
            (c.quic.socket_recv_buffer, c.quic.socket_send_buffer),
            (0, 65536)
        );
        assert_eq!(c.quic.stats_interval, 10);
        let c = Config::parse("[quic]\nstats_interval = 0").unwrap();
        assert_eq!(c.quic.stats_interval, 0);
    }

    #[test]
    fn the_relay_table_defaults_to_nobody_allowed() {
        let c = Config::parse("").unwrap();
        assert!(c.relay.allow.is_empty() && !c.relay.allow_any);
        assert_eq!(c.relay.max_clients, 1024);
        let c = Config::parse("[relay]\nallow = ['ab']\nclient_rate = 1000000\n").unwrap();
        assert_eq!(c.relay.allow, ["ab"]);
        assert_eq!(c.relay.client_rate, 1_000_000);
        assert!(Config::parse("[relay]\nallow_all = true").is_err());
    }

    #[test]
    fn the_p2p_table_and_listener() {
        let c = Config::parse(
            "listen = ['p2p://']\n[p2p]\nrelays = ['https://relay.example:4433']\n\
             bind = ['0.0.0.0:7000', '[::]:7000']\nallow = ['ab']\nuse_node_id_as_username = true\n",
        )
        .unwrap();
        assert_eq!(c.p2p.relays, ["https://relay.example:4433"]);
        assert_eq!(c.p2p.bind.len(), 2);
        assert_eq!(c.p2p.allow, ["ab"]);
        assert!(c.p2p.use_node_id_as_username);
        assert!(Config::parse("[p2p]\nrelay = []").is_err());
        let l = Listener::parse("p2p://").unwrap();
        assert_eq!(l.kind, ListenerKind::P2p);
        assert_eq!(l.addr, "0.0.0.0:0".parse().unwrap());
        assert!(l.kind.is_mqtt() && !l.kind.uses_tls());
        let l = Listener::parse("p2p://127.0.0.1:7000").unwrap();
        assert_eq!(l.addr.port(), 7000);
        // Reachable through relays, whatever it binds: no anonymous access by default.
        assert!(!l.is_loopback());
        let c = Config {
            listen: vec!["p2p://127.0.0.1:0".into()],
            ..Config::default()
        };
        assert!(!c.anonymous_allowed());
        assert!(Listener::parse("p2p://127.0.0.1:7000/t").is_err());
        assert!(Listener::parse("p2p://?proxy_protocol=true").is_err());
    }

    #[test]
    fn anonymous_defaults_to_loopback_only() {
        let mut c = Config {
            listen: vec!["tcp://127.0.0.1:1883".into()],
            ..Config::default()
        };
        assert!(c.anonymous_allowed());
        c.password_file = Some("pw".into());
        assert!(
            !c.anonymous_allowed(),
            "a password file means credentials are wanted"
        );
        c.password_file = None;
        c.listen.push("tcp://0.0.0.0:1884".into());
        assert!(!c.anonymous_allowed());
        c.allow_anonymous = Some(true);
        assert!(c.anonymous_allowed());
    }

    #[test]
    fn listener_urls() {
        let l = Listener::parse("tcp://127.0.0.1:1883").unwrap();
        assert_eq!(l.kind, ListenerKind::Tcp);
        assert!(l.is_loopback());
        assert!(Listener::parse("udp://1.2.3.4:1").is_err());
        assert!(Listener::parse("tcp://nohost").is_err());
        assert_eq!(
            Listener::parse("http://[::1]:8081").unwrap().kind,
            ListenerKind::Http
        );
    }

    #[test]
    fn listener_kinds_paths_and_options() {
        let tls = Listener::parse("mqtts://127.0.0.1:8883?proxy_protocol=true").unwrap();
        assert_eq!(tls.kind, ListenerKind::Tls);
        assert!(tls.proxy_protocol && !tls.trust_proxy && tls.path.is_none());
        let ws = Listener::parse("ws://0.0.0.0:8083").unwrap();
        assert_eq!(
            (ws.kind, ws.path.as_deref()),
            (ListenerKind::Ws, Some("/mqtt"))
        );
        let quic = Listener::parse("quic://127.0.0.1:14567").unwrap();
        assert_eq!(
            (quic.kind, quic.path.as_deref()),
            (ListenerKind::Quic, None)
        );
        assert!(quic.kind.uses_tls() && quic.kind.is_mqtt());
        let relay = Listener::parse("relay://0.0.0.0:4433").unwrap();
        assert_eq!(
            (relay.kind, relay.path.as_deref()),
            (ListenerKind::Relay, None)
        );
        assert!(relay.kind.uses_tls() && !relay.kind.is_mqtt());
        let wss = Listener::parse("wss://[::1]:8084/broker/?trust_proxy=1").unwrap();
        assert_eq!(wss.kind, ListenerKind::Wss);
        assert_eq!(wss.path.as_deref(), Some("/broker"));
        assert!(wss.trust_proxy && !wss.proxy_protocol);
        let ws = Listener::parse("ws://127.0.0.1:8083?proxy_protocol=true&trust_proxy").unwrap();
        assert!(ws.proxy_protocol && ws.trust_proxy);
        let wss = Listener::parse("wss://127.0.0.1:8084?proxy_protocol=true").unwrap();
        assert!(wss.proxy_protocol && !wss.trust_proxy);
        for bad in [
            "tcp://127.0.0.1:1883/mqtt",
            "http://127.0.0.1:8081?proxy_protocol=true",
            "tcp://127.0.0.1:1883?trust_proxy=true",
            "tcp://127.0.0.1:1883?proxy_protocol=maybe",
            "tls://127.0.0.1:8883?colour=blue",
            "quic://127.0.0.1:14567/mqtt",
            "quic://127.0.0.1:14567?proxy_protocol=true",
            "relay://127.0.0.1:4433/relay",
            "relay://127.0.0.1:4433?proxy_protocol=true",
        ] {
            assert!(
                matches!(Listener::parse(bad), Err(ConfigError::Listener { .. })),
                "{bad}"
            );
        }
    }
}
