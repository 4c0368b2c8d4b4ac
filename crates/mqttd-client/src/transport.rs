//! Byte streams to a server: TCP, TLS, WebSocket, WebSocket over TLS, QUIC and peer-to-peer
//! node connections.
//!
//! An [`Endpoint`] says where the server is and how to reach it; a [`Connector`] is an endpoint
//! whose TLS configuration (CA file, client certificate) has been loaded, so that its mistakes
//! show before the first connection and a load generator loads the files once. Every transport
//! ends as a [`ByteStream`], so [`crate::connect`] runs the same MQTT session over each.
//!
//! TLS (cargo feature `tls`) is rustls with the ring provider. WebSocket (cargo feature `ws`) is
//! tokio-tungstenite with the `mqtt` subprotocol, one MQTT write per binary frame; its frames
//! are turned back into a byte stream by a small pump task that ends when either side
//! closes.
//!
//! QUIC (cargo feature `quic`) is noq with rustls (TLS 1.3 only, ALPN `mqtt`), CUBIC
//! congestion control and 0-RTT resumption from the connector's session tickets. In
//! single-stream mode the first bidirectional stream is the byte stream; in multi-stream mode
//! ([`QuicOptions::data_streams`]) [`crate::connect_to`] adds data streams after CONNACK.
//!
//! Peer-to-peer (cargo feature `p2p`, `p2p://NODE_ID`) is a connection of an mqttd-p2p node
//! to the broker's node, dialed by its id through relays ([`P2pOptions::relays`]) or at direct
//! addresses ([`P2pOptions::direct`]), or both; its streams are noq's, so MQTT uses them as
//! over QUIC, single- or multi-stream. The connector binds its node on first use, with an
//! ephemeral key unless [`P2pOptions::key_file`] names one.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{lookup_host, TcpStream};

#[cfg(feature = "p2p")]
mod p2p;
#[cfg(feature = "quic")]
mod quic;
#[cfg(feature = "tls")]
mod tls;
#[cfg(feature = "ws")]
mod ws;

#[cfg(feature = "quic")]
pub(crate) use quic::{close as quic_close, open_data_stream, QuicConn, QuicConnection};
#[cfg(feature = "quic")]
pub use quic::{QuicInfo, QuicStream, ZeroRtt, ALPN as QUIC_ALPN, HANDSHAKE_TIMEOUT};
#[cfg(feature = "tls")]
pub use tls::CertCheck;

/// A byte stream that can carry an MQTT connection.
pub trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> ByteStream for T {}

/// How the bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// Plain TCP (`mqtt://`, port 1883).
    Tcp,
    /// TLS over TCP (`mqtts://`, port 8883).
    Tls,
    /// WebSocket (`ws://`, port 8083).
    Ws,
    /// WebSocket over TLS (`wss://`, port 8084).
    Wss,
    /// MQTT over QUIC (`quic://`, UDP port 14567), TLS 1.3 with ALPN `mqtt`.
    Quic,
    /// MQTT over a peer-to-peer node connection (`p2p://NODE_ID`): QUIC with ALPN `mqtt`
    /// to the broker's node, dialed by its id; no port.
    P2p,
}

impl Transport {
    /// The port a URL of this kind means when it names none.
    pub fn default_port(self) -> u16 {
        match self {
            Self::Tcp => 1883,
            Self::Tls => 8883,
            Self::Ws => 8083,
            Self::Wss => 8084,
            Self::Quic => 14567,
            Self::P2p => 0,
        }
    }

    /// Whether the stream is encrypted (QUIC and peer-to-peer always are).
    pub fn is_tls(self) -> bool {
        matches!(self, Self::Tls | Self::Wss | Self::Quic | Self::P2p)
    }

    /// Whether MQTT runs over QUIC streams (`quic://` or `p2p://`), single- or multi-stream.
    pub fn is_quic(self) -> bool {
        matches!(self, Self::Quic | Self::P2p)
    }

    /// Whether MQTT travels in WebSocket frames.
    pub fn is_websocket(self) -> bool {
        matches!(self, Self::Ws | Self::Wss)
    }

    /// The URL scheme.
    pub fn scheme(self) -> &'static str {
        match self {
            Self::Tcp => "mqtt",
            Self::Tls => "mqtts",
            Self::Ws => "ws",
            Self::Wss => "wss",
            Self::Quic => "quic",
            Self::P2p => "p2p",
        }
    }

    /// The same transport with TLS added (TCP becomes TLS, WebSocket becomes secure WebSocket;
    /// QUIC has it already).
    pub fn with_tls(self) -> Self {
        match self {
            Self::Tcp | Self::Tls => Self::Tls,
            Self::Ws | Self::Wss => Self::Wss,
            Self::Quic => Self::Quic,
            Self::P2p => Self::P2p,
        }
    }
}

/// The WebSocket path used when a URL names none.
pub const DEFAULT_WS_PATH: &str = "/mqtt";

/// Certificates and checks for a TLS connection.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct TlsOptions {
    /// PEM file of the CA certificates to trust; the system's store when neither this nor
    /// [`TlsOptions::ca_path`] is set.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client's certificate chain (with [`TlsOptions::key_file`]).
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client's private key.
    pub key_file: Option<PathBuf>,
    /// A directory whose PEM files hold CA certificates to trust (Mosquitto's `--capath`):
    /// every certificate in every file, whatever the file's name; with
    /// [`TlsOptions::ca_file`], both are trusted.
    pub ca_path: Option<PathBuf>,
    /// The one TLS version to speak; 1.3 or 1.2 as the server prefers when unset.
    pub version: Option<TlsVersion>,
    /// Accept a certificate issued for another host name. The chain is still verified (as
    /// Mosquitto's `--insecure`): this only skips the host name check.
    pub insecure: bool,
}

impl TlsOptions {
    /// Whether any option asks for TLS.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some()
            || self.ca_path.is_some()
            || self.cert_file.is_some()
            || self.key_file.is_some()
    }
}

/// A TLS protocol version a client can be pinned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsVersion {
    /// TLS 1.2.
    Tls12,
    /// TLS 1.3.
    Tls13,
}

impl FromStr for TlsVersion {
    type Err = String;

    /// Mosquitto's names: `tlsv1.2`, `tlsv1.3`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tlsv1.2" => Ok(Self::Tls12),
            "tlsv1.3" => Ok(Self::Tls13),
            "tlsv1.1" | "tlsv1" => Err(format!("{s} is not supported (tlsv1.2 or tlsv1.3)")),
            _ => Err(format!("unknown TLS version {s:?} (tlsv1.2 or tlsv1.3)")),
        }
    }
}

/// How MQTT uses a QUIC connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuicOptions {
    /// Data streams besides the control stream; 0 carries everything on the first stream
    /// (single-stream mode). With N > 0 (multi-stream mode, EMQX's semantics) the control
    /// stream carries CONNECT/CONNACK, PING, DISCONNECT and AUTH; each PUBLISH goes on the
    /// data stream its topic hashes to, each SUBSCRIBE and UNSUBSCRIBE on the one its first
    /// filter hashes to, and the server answers and delivers on the stream of the request.
    pub data_streams: u16,
    /// UDP sockets the connector spreads its connections over, each a QUIC endpoint of its
    /// own; 0 and 1 both mean one. A load generator that opens thousands of connections at
    /// once uses several, as that many devices would, so that no one socket's receive buffer
    /// overflows with the servers' answers.
    pub sockets: u16,
}

/// How to reach a broker's peer-to-peer node (`p2p://NODE_ID`): through relays, at direct
/// addresses, or both; and the client node's own key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct P2pOptions {
    /// Relay URLs (`https://HOST:PORT`) the client node uses: the broker's node is dialed
    /// through the first unless a direct address works first.
    pub relays: Vec<String>,
    /// PEM CA certificates the relays' certificates are checked against, besides the
    /// compiled-in Mozilla roots (a broker's generated `<data_dir>/tls/ca.pem`).
    pub relay_cafile: Option<PathBuf>,
    /// UDP addresses the broker's node may be reached at directly.
    pub direct: Vec<SocketAddr>,
    /// The client node's key file (created if missing, as `<data_dir>/node.key` is); an
    /// ephemeral key when unset.
    pub key_file: Option<PathBuf>,
}

/// Where a server is and how to reach it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Endpoint {
    /// The transport.
    pub transport: Transport,
    /// Host name or IP address; also the TLS server name. For `p2p://`, the broker's node id.
    pub host: String,
    /// Port (none for `p2p://`: 0).
    pub port: u16,
    /// WebSocket path (WebSocket transports only).
    pub path: String,
    /// TLS settings (TLS transports and QUIC).
    pub tls: TlsOptions,
    /// QUIC settings (QUIC and peer-to-peer).
    pub quic: QuicOptions,
    /// Peer-to-peer settings (`p2p://` only).
    pub p2p: P2pOptions,
    /// Time allowed for the transport's set-up: TCP connect, TLS, QUIC and WebSocket
    /// handshakes. A QUIC handshake gets at most `HANDSHAKE_TIMEOUT` (10 s) of it: a host
    /// where nothing listens on UDP does not answer at all.
    pub timeout: Duration,
}

impl Endpoint {
    /// `host:port` over `transport`, on the default WebSocket path, trusting the system's CAs.
    pub fn new(transport: Transport, host: impl Into<String>, port: u16) -> Self {
        Self {
            transport,
            host: host.into(),
            port,
            path: DEFAULT_WS_PATH.to_owned(),
            tls: TlsOptions::default(),
            quic: QuicOptions::default(),
            p2p: P2pOptions::default(),
            timeout: Duration::from_secs(30),
        }
    }

    /// The WebSocket URL (`ws://host:port/path`), for the handshake and for messages.
    pub fn ws_url(&self) -> String {
        let scheme = if self.transport.is_tls() { "wss" } else { "ws" };
        format!(
            "{scheme}://{}:{}{}",
            url_host(&self.host),
            self.port,
            self.path
        )
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.transport.is_websocket() {
            f.write_str(&self.ws_url())
        } else if self.transport == Transport::P2p {
            write!(f, "p2p://{}", self.host)
        } else {
            let scheme = self.transport.scheme();
            write!(f, "{scheme}://{}:{}", url_host(&self.host), self.port)
        }
    }
}

/// An IPv6 literal goes in brackets in a URL.
fn url_host(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// A server URL as `mosquitto_pub -L` takes it, extended with WebSocket, QUIC and
/// peer-to-peer schemes: `mqtt://`, `mqtts://`, `ws://`, `wss://`, `quic://`, then
/// `[user[:password]@]host[:port][/path]`; or `p2p://[user[:password]@]NODE_ID[/path]`.
///
/// For `mqtt://`, `mqtts://`, `quic://` and `p2p://` the path is a topic (as Mosquitto reads
/// it); for `ws://` and `wss://` it is the WebSocket path (default [`DEFAULT_WS_PATH`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerUrl {
    /// The server.
    pub endpoint: Endpoint,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Topic (MQTT and QUIC schemes only).
    pub topic: Option<String>,
}

/// A URL [`ServerUrl`] cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid URL {url:?}: {reason}")]
pub struct UrlError {
    url: String,
    reason: &'static str,
}

impl FromStr for ServerUrl {
    type Err = UrlError;

    fn from_str(url: &str) -> Result<Self, UrlError> {
        let fail = |reason| UrlError {
            url: url.to_owned(),
            reason,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| fail("expected mqtt://, mqtts://, ws://, wss://, quic:// or p2p://"))?;
        let transport = match scheme.to_ascii_lowercase().as_str() {
            "mqtt" | "tcp" => Transport::Tcp,
            "mqtts" | "ssl" | "tls" => Transport::Tls,
            "ws" => Transport::Ws,
            "wss" => Transport::Wss,
            "quic" => Transport::Quic,
            "p2p" => Transport::P2p,
            _ => return Err(fail("unknown scheme (mqtt, mqtts, ws, wss, quic or p2p)")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        // The password may contain '@'; the host may not.
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(info) => match info.split_once(':') {
                Some((u, p)) => (Some(u.to_owned()), Some(p.to_owned())),
                None => (Some(info.to_owned()), None),
            },
        };
        let (host, port) = match transport {
            // A node id has no port.
            Transport::P2p => (hostport, Some(0)),
            _ => split_host_port(hostport).ok_or_else(|| fail("bad host or port"))?,
        };
        if host.is_empty() {
            return Err(fail(match transport {
                Transport::P2p => "no node id",
                _ => "no host",
            }));
        }
        let port = port.unwrap_or_else(|| transport.default_port());
        let mut endpoint = Endpoint::new(transport, host, port);
        let mut topic = None;
        if transport.is_websocket() {
            if !path.is_empty() {
                endpoint.path = path.to_owned();
            }
        } else if let Some(t) = path.strip_prefix('/').filter(|t| !t.is_empty()) {
            topic = Some(t.to_owned());
        }
        Ok(Self {
            endpoint,
            username,
            password,
            topic,
        })
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?.parse().ok()?))),
        };
    }
    match s.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((s, None)),
    }
}

/// Why a transport could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host.
        host: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// No address of the host accepted a TCP connection (refused, unreachable, ...).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The last address tried.
        addr: SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The set-up took longer than [`Endpoint::timeout`].
    #[error("no connection to {endpoint} within {timeout:?}")]
    Timeout {
        /// The endpoint, as a URL.
        endpoint: String,
        /// The limit.
        timeout: Duration,
    },
    /// The TLS configuration could not be built: a file is missing or is not PEM, or the
    /// host is not a valid server name.
    #[error("TLS set-up: {0}")]
    TlsConfig(String),
    /// The TLS handshake failed.
    #[cfg(feature = "tls")]
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The WebSocket upgrade failed.
    #[error("WebSocket handshake with {url} failed: {reason}")]
    WebSocket {
        /// The WebSocket URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The QUIC connection failed for a reason other than TLS (the server closed or reset it,
    /// a protocol violation, no usable address).
    #[error("QUIC: {0}")]
    Quic(String),
    /// The server refused the connection before MQTT began: it closed it with QUIC
    /// application error 0x87, not authorized (a broker's `p2p.allow` that does not list the
    /// client's node).
    #[error("the server refused the connection: {0}")]
    Refused(String),
    /// The peer-to-peer settings are unusable: the node id, a relay URL, the relay CA file or
    /// the key file.
    #[error("peer-to-peer set-up: {0}")]
    P2pConfig(String),
    /// The transport needs a cargo feature this build lacks.
    #[error("{transport} needs mqttd-client's cargo feature `{feature}`")]
    Unsupported {
        /// The transport.
        transport: &'static str,
        /// The feature.
        feature: &'static str,
    },
}

#[cfg(feature = "tls")]
pub use tls::TlsError;

/// An [`Endpoint`] ready to open connections: its TLS files are loaded.
#[derive(Clone)]
pub struct Connector {
    endpoint: Endpoint,
    #[cfg(feature = "tls")]
    tls: Option<tls::Tls>,
    /// Sockets, TLS configuration and session tickets, shared by the connector's clones.
    #[cfg(feature = "quic")]
    quic: Option<std::sync::Arc<quic::Quic>>,
    /// The client node, shared by the connector's clones.
    #[cfg(feature = "p2p")]
    p2p: Option<std::sync::Arc<p2p::P2p>>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Loads the endpoint's TLS files (for TLS transports) and checks that this build supports
    /// its transport.
    pub fn new(endpoint: Endpoint) -> Result<Self, TransportError> {
        #[cfg(not(feature = "tls"))]
        if endpoint.transport.is_tls() {
            return Err(TransportError::Unsupported {
                transport: "TLS",
                feature: "tls",
            });
        }
        #[cfg(not(feature = "quic"))]
        if endpoint.transport == Transport::Quic {
            return Err(TransportError::Unsupported {
                transport: "QUIC",
                feature: "quic",
            });
        }
        #[cfg(not(feature = "p2p"))]
        if endpoint.transport == Transport::P2p {
            return Err(TransportError::Unsupported {
                transport: "peer-to-peer",
                feature: "p2p",
            });
        }
        #[cfg(not(feature = "ws"))]
        if endpoint.transport.is_websocket() {
            return Err(TransportError::Unsupported {
                transport: "WebSocket",
                feature: "ws",
            });
        }
        #[cfg(feature = "tls")]
        let tls = match endpoint.transport {
            Transport::Tls | Transport::Wss => Some(tls::Tls::new(&endpoint.host, &endpoint.tls)?),
            _ => None,
        };
        #[cfg(feature = "quic")]
        let quic = match endpoint.transport {
            Transport::Quic => Some(std::sync::Arc::new(quic::Quic::new(
                &endpoint.host,
                &endpoint.tls,
                endpoint.quic.sockets,
            )?)),
            _ => None,
        };
        #[cfg(feature = "p2p")]
        let p2p = match endpoint.transport {
            Transport::P2p => Some(std::sync::Arc::new(p2p::P2p::new(&endpoint)?)),
            _ => None,
        };
        Ok(Self {
            endpoint,
            #[cfg(feature = "tls")]
            tls,
            #[cfg(feature = "quic")]
            quic,
            #[cfg(feature = "p2p")]
            p2p,
        })
    }

    /// Connects over QUIC and opens the control stream (the handshake bounded by
    /// `HANDSHAKE_TIMEOUT`, or 0-RTT with a cached session ticket); or, peer-to-peer, dials
    /// the broker's node and opens the control stream.
    #[cfg(feature = "quic")]
    pub(crate) async fn open_quic(&self) -> Option<Result<QuicConnection, TransportError>> {
        #[cfg(feature = "p2p")]
        if let Some(p2p) = &self.p2p {
            return Some(p2p.connect(&self.endpoint).await);
        }
        let quic = self.quic.as_ref()?;
        Some(quic.connect(&self.endpoint).await)
    }

    /// The client node's id (`p2p://` only), once it is bound (at the first connection).
    #[cfg(feature = "p2p")]
    pub fn node_id(&self) -> Option<String> {
        self.p2p.as_ref()?.node_id()
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Opens a stream: TCP connect, then the TLS and WebSocket handshakes the transport needs,
    /// within [`Endpoint::timeout`]. For QUIC and peer-to-peer: the connection's first
    /// bidirectional stream (single-stream mode; [`crate::connect_to`] also does multi-stream
    /// mode).
    pub async fn open(&self) -> Result<Box<dyn ByteStream>, TransportError> {
        #[cfg(feature = "quic")]
        if let Some(quic) = self.open_quic().await {
            return Ok(Box::new(quic?.control));
        }
        let timeout = self.endpoint.timeout;
        match tokio::time::timeout(timeout, self.open_now()).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout {
                endpoint: self.endpoint.to_string(),
                timeout,
            }),
        }
    }

    async fn open_now(&self) -> Result<Box<dyn ByteStream>, TransportError> {
        let tcp = tcp_connect(&self.endpoint.host, self.endpoint.port).await?;
        #[cfg(feature = "tls")]
        let stream: Box<dyn ByteStream> = match &self.tls {
            Some(tls) => Box::new(tls.handshake(tcp).await?),
            None => Box::new(tcp),
        };
        #[cfg(not(feature = "tls"))]
        let stream: Box<dyn ByteStream> = Box::new(tcp);
        #[cfg(feature = "ws")]
        if self.endpoint.transport.is_websocket() {
            return Ok(Box::new(
                ws::upgrade(stream, &self.endpoint.ws_url()).await?,
            ));
        }
        Ok(stream)
    }
}

/// Connects to the first address of `host` that accepts.
async fn tcp_connect(host: &str, port: u16) -> Result<TcpStream, TransportError> {
    let addrs = lookup_host((host, port))
        .await
        .map_err(|source| TransportError::Resolve {
            host: host.to_owned(),
            source,
        })?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                // Small MQTT packets (acknowledgements) must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(source) => last = Some(TransportError::Connect { addr, source }),
        }
    }
    Err(last.unwrap_or_else(|| TransportError::Resolve {
        host: host.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> ServerUrl {
        url.parse().unwrap()
    }

    #[test]
    fn urls_as_mosquitto_reads_them() {
        let u = parse("mqtt://alice:s3cr@t@broker.example:1884/a/b");
        assert_eq!(u.endpoint.transport, Transport::Tcp);
        assert_eq!(u.endpoint.host, "broker.example");
        assert_eq!(u.endpoint.port, 1884);
        assert_eq!(u.username.as_deref(), Some("alice"));
        assert_eq!(u.password.as_deref(), Some("s3cr@t"));
        assert_eq!(u.topic.as_deref(), Some("a/b"));

        let u = parse("mqtts://host");
        assert_eq!(
            (u.endpoint.transport, u.endpoint.port),
            (Transport::Tls, 8883)
        );
        assert_eq!(u.topic, None);
        assert_eq!(u.username, None);
    }

    #[test]
    fn websocket_urls_keep_their_path() {
        let u = parse("ws://h");
        assert_eq!((u.endpoint.port, u.endpoint.path.as_str()), (8083, "/mqtt"));
        assert_eq!(u.endpoint.ws_url(), "ws://h:8083/mqtt");
        let u = parse("wss://bob@[::1]:9000/custom/path");
        assert_eq!(u.endpoint.transport, Transport::Wss);
        assert_eq!((u.endpoint.host.as_str(), u.endpoint.port), ("::1", 9000));
        assert_eq!(u.endpoint.path, "/custom/path");
        assert_eq!(u.endpoint.ws_url(), "wss://[::1]:9000/custom/path");
        assert_eq!(u.topic, None);
        assert_eq!(u.username.as_deref(), Some("bob"));
    }

    #[test]
    fn quic_urls() {
        let u = parse("quic://broker.example/a/b");
        assert_eq!(u.endpoint.transport, Transport::Quic);
        assert_eq!(u.endpoint.port, 14567);
        assert_eq!(u.topic.as_deref(), Some("a/b"));
        assert_eq!(u.endpoint.to_string(), "quic://broker.example:14567");
        let u = parse("QUIC://u:p@[::1]:4433");
        assert_eq!((u.endpoint.host.as_str(), u.endpoint.port), ("::1", 4433));
        assert_eq!(u.endpoint.to_string(), "quic://[::1]:4433");
        assert_eq!(u.password.as_deref(), Some("p"));
        assert!(Transport::Quic.is_tls());
        assert!(!Transport::Quic.is_websocket());
        assert_eq!(Transport::Quic.with_tls(), Transport::Quic);
        assert_eq!(u.endpoint.quic.data_streams, 0);
    }

    #[test]
    fn p2p_urls_name_a_node() {
        let id = "ae58ff8833241ac82d6ff7611046ed67b5072d142c588d0063e942d9a75502b6";
        let u = parse(&format!("p2p://alice:pw@{id}/a/b"));
        assert_eq!(u.endpoint.transport, Transport::P2p);
        assert_eq!((u.endpoint.host.as_str(), u.endpoint.port), (id, 0));
        assert_eq!(u.topic.as_deref(), Some("a/b"));
        assert_eq!(u.username.as_deref(), Some("alice"));
        assert_eq!(u.endpoint.to_string(), format!("p2p://{id}"));
        assert!(Transport::P2p.is_quic() && Transport::P2p.is_tls());
        assert!("p2p:///t".parse::<ServerUrl>().is_err());
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in [
            "broker:1883",
            "http://h",
            "mqtt://",
            "mqtt://h:port",
            "mqtt://[::1",
        ] {
            assert!(url.parse::<ServerUrl>().is_err(), "{url}");
        }
    }
}
