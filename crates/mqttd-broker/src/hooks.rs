//! Extension points for programs that embed the broker: authentication, authorization and
//! message interception, each told which transport the client came over.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use mqttd_proto::{ClientId, Message, MqttStr, ProtocolVersion, ReasonCode};

/// The transport a client connected over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transport {
    /// Plain TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
    /// WebSocket.
    WebSocket,
    /// WebSocket over TLS.
    WebSocketTls,
    /// MQTT over QUIC.
    Quic,
    /// A bridge's own session in this broker (see [`crate::bridge`]): a trusted internal
    /// identity, which needs no credentials and which neither the ACL nor
    /// [`Hooks::authorize`] is asked about.
    Bridge,
    /// MQTT over a peer-to-peer node connection (`p2p://`): QUIC, dialed by node id, direct or
    /// through a relay.
    P2p,
}

impl Transport {
    /// The lower-case name used in logs, metrics and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Tls => "tls",
            Self::WebSocket => "ws",
            Self::WebSocketTls => "wss",
            Self::Quic => "quic",
            Self::Bridge => "bridge",
            Self::P2p => "p2p",
        }
    }

    /// Whether the transport encrypts (and so may carry a verified client identity: a
    /// certificate's, or a peer-to-peer node's id).
    pub fn is_secure(self) -> bool {
        matches!(
            self,
            Self::Tls | Self::WebSocketTls | Self::Quic | Self::P2p
        )
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a connection came from.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Transport.
    pub transport: Transport,
    /// Remote address. On `p2p://`, the peer's UDP address if the connection came straight
    /// from it, else (through a relay) the unspecified address `0.0.0.0:0`.
    pub addr: SocketAddr,
    /// Name of the listener that accepted it.
    pub listener: Arc<str>,
    /// The identity in the client's TLS certificate, verified against `tls.ca_file`: its
    /// subject CN, else its first DNS or e-mail subject alternative name. `None` without a
    /// verified client certificate (or one that names nobody), and on transports without TLS.
    /// With `tls.use_identity_as_username` it is the client's user name.
    ///
    /// On `p2p://` ([`Transport::P2p`]): the peer's node id, 64 hex digits, which its handshake
    /// proved (its TLS identity is its Ed25519 key). With `p2p.use_node_id_as_username` it is
    /// the client's user name.
    pub tls_identity: Option<Arc<str>>,
}

impl Peer {
    /// A peer without a client certificate.
    pub fn new(transport: Transport, addr: SocketAddr, listener: Arc<str>) -> Self {
        Self {
            transport,
            addr,
            listener,
            tls_identity: None,
        }
    }
}

/// A connected client, as hooks see it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// Client identifier (the assigned one, if the server assigned it).
    pub client_id: ClientId,
    /// User name: from CONNECT, from SCRAM, the client certificate's identity with
    /// `tls.use_identity_as_username`, or the peer's node id with
    /// `p2p.use_node_id_as_username`.
    pub username: Option<MqttStr>,
    /// Protocol version.
    pub version: ProtocolVersion,
    /// Where it came from.
    pub peer: Peer,
}

/// A CONNECT to authenticate.
#[derive(Debug)]
pub struct ConnectAttempt<'a> {
    /// Client identifier as sent (may be empty).
    pub client_id: &'a ClientId,
    /// User name.
    pub username: Option<&'a MqttStr>,
    /// Password. Never log it.
    pub password: Option<&'a Bytes>,
    /// Protocol version.
    pub version: ProtocolVersion,
    /// Where it came from.
    pub peer: &'a Peer,
}

/// A hook's answer to an authentication or authorization question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Allow; skip the built-in checks.
    Allow,
    /// Refuse with this reason code.
    Deny(ReasonCode),
    /// No opinion: let the built-in checks decide (password file, `allow_anonymous`, ACL).
    Defer,
}

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Publish to a topic name.
    Publish,
    /// Subscribe to a topic filter.
    Subscribe,
    /// Receive a message on a topic name.
    Receive,
}

/// What to do with a message a client published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intercept {
    /// Route it as it is (possibly changed in place).
    Continue,
    /// Drop it; the publisher still gets its acknowledgement with this reason code
    /// (MQTT 5 only; 3.1.1 clients get a plain acknowledgement).
    Drop(ReasonCode),
}

/// Callbacks into an embedding program. Every method has a default that defers to the
/// broker's built-in behaviour, so an implementation overrides only what it needs. They run on
/// the connection's task, keep them quick; except `authenticate` for a CONNECT with a user
/// name while a password file is configured, which runs with the password check on the
/// blocking pool (a bounded number at once), so it may take a while.
pub trait Hooks: Send + Sync + 'static {
    /// Decides whether a CONNECT with user name and password may proceed.
    fn authenticate(&self, attempt: &ConnectAttempt<'_>) -> Verdict {
        let _ = attempt;
        Verdict::Defer
    }

    /// Decides whether `client` may perform `action` on `topic`. [`Action::Receive`] is asked
    /// for every message about to be sent to a client, routed or retained, whether or not an
    /// ACL file is configured: answer it quickly.
    fn authorize(&self, client: &ClientInfo, action: Action, topic: &str) -> Verdict {
        let _ = (client, action, topic);
        Verdict::Defer
    }

    /// Sees, and may change or drop, every message a client publishes before it is routed.
    fn on_publish(&self, client: &ClientInfo, message: &mut Message) -> Intercept {
        let _ = (client, message);
        Intercept::Continue
    }

    /// A client completed CONNECT.
    fn on_connected(&self, client: &ClientInfo) {
        let _ = client;
    }

    /// A client's connection closed.
    fn on_disconnected(&self, client: &ClientInfo, reason: ReasonCode) {
        let _ = (client, reason);
    }
}

/// Hooks that defer everything to the built-in behaviour.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl Hooks for NoHooks {}
