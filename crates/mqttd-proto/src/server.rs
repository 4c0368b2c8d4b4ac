//! The broker's side of one client connection.
//!
//! ```text
//!                 CONNECT                 accept()
//! AwaitingConnect -------> Connecting ----------------> Connected --+--> Closed
//!       |                  |   ^   \ auth_continue()        |       |
//!       | timeout          |   |    v                       |       |
//!       +------------------+   Authenticating               |       |
//!                          |   (client AUTH -> event)       |       |
//!                          +-- reject() / timeout ----------+-------+
//! ```
//!
//! The machine decides everything the protocol decides (packet order, flow control, QoS flows,
//! keep alive, topic aliases) and hands everything else to the broker as an [`Event`]: whether a
//! client may connect, what a subscription grants, where a message goes, and when a message is
//! safe to acknowledge. The broker answers through methods such as [`ServerConnection::accept`]
//! and [`ServerConnection::publish_ack`]. Packets it wants sent come out of
//! [`ServerConnection::poll_transmit`]; the driver encodes them with
//! [`ServerConnection::version`].
//!
//! # Streams
//!
//! A byte-stream driver (TCP, TLS, WebSocket) uses the calls above, which all act on
//! [`StreamId::CONTROL`]. A multi-stream QUIC driver names the stream of each packet with
//! [`ServerConnection::handle_packet_on`], takes transmits with their stream from
//! [`ServerConnection::poll_transmit_tagged`] and events with the stream of the packet that
//! caused them from [`ServerConnection::poll_event_tagged`], delivers a subscription's messages
//! on the stream the SUBSCRIBE came on with [`ServerConnection::deliver_on`], and reports a data
//! stream that ended with [`ServerConnection::stream_lost`]. The machine then answers each
//! PUBLISH, PUBREL, SUBSCRIBE, UNSUBSCRIBE and PINGREQ on the stream it came on, sends each
//! PUBREL on the stream of its PUBLISH, keeps topic aliases per stream, and moves whatever was
//! owed on a lost stream to the control stream. Packet identifiers stay per session.
//!
//! Only MQTT packets reach this machine, so transport-level keep-alives (QUIC PINGs) never count
//! as client activity.

use std::collections::VecDeque;
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec::DecodeError;
use crate::flow::{
    ack_after_close, FlowEvent, Flows, IdleFlows, InboundPublish, LocalLimits, PeerLimits,
    Transmits, Violation,
};
use crate::message::Delivery;
use crate::packet::*;
use crate::reason::{puback_reason, reason_for, ReasonCode, ReasonContext};
use crate::session::{Enqueued, Session, NEVER_EXPIRES};
use crate::sparse::SparseMap;
use crate::types::{ClientId, MqttStr, PacketId, ProtocolVersion, QoS, StreamId};

/// Packets a client may pipeline behind CONNECT before the broker has accepted it.
const MAX_EARLY_PACKETS: usize = 64;

/// What the server announces and enforces. Names follow Mosquitto's settings where they mean
/// the same.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest packet accepted from clients, header included (`max_packet_size`).
    pub max_packet_size: u32,
    /// QoS 1 and 2 messages a client may have unacknowledged towards the server.
    pub receive_maximum: u16,
    /// QoS 1 and 2 messages in flight towards a client, further capped by the client's own
    /// receive maximum (`max_inflight_messages`).
    pub max_inflight_messages: u16,
    /// Topic aliases a client may set on this connection.
    pub topic_alias_maximum: u16,
    /// Highest QoS accepted from clients.
    pub maximum_qos: QoS,
    /// Whether retained messages are supported.
    pub retain_available: bool,
    /// Whether wildcard subscriptions are supported.
    pub wildcard_subscription_available: bool,
    /// Whether subscription identifiers are supported.
    pub subscription_identifiers_available: bool,
    /// Whether shared subscriptions are supported.
    pub shared_subscription_available: bool,
    /// Largest keep alive a client may use, in seconds; 0 for no limit (`max_keepalive`).
    pub max_keepalive: u16,
    /// Largest session expiry interval granted to MQTT 5 clients.
    pub max_session_expiry: u32,
    /// Session expiry of MQTT 3.1.1 clients that connect with clean session 0
    /// (`persistent_client_expiration`); never, by default.
    pub v3_session_expiry: u32,
    /// Time allowed from connection to CONNACK, authentication included.
    pub connect_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_packet_size: 1024 * 1024,
            receive_maximum: 1024,
            max_inflight_messages: 64,
            topic_alias_maximum: 64,
            maximum_qos: QoS::ExactlyOnce,
            retain_available: true,
            wildcard_subscription_available: true,
            subscription_identifiers_available: true,
            shared_subscription_available: true,
            max_keepalive: 0,
            max_session_expiry: NEVER_EXPIRES,
            v3_session_expiry: NEVER_EXPIRES,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A client asking to connect; answer with [`ServerConnection::accept`],
/// [`ServerConnection::reject`] or [`ServerConnection::auth_continue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The CONNECT as received.
    pub connect: Box<Connect>,
    /// The session expiry interval the server will grant.
    pub session_expiry_interval: u32,
    /// The keep alive the server will enforce, in seconds.
    pub keep_alive: u16,
}

/// The broker's acceptance of a connection.
#[derive(Debug)]
pub struct Accept {
    /// The session the client gets: a stored one being resumed, or a new one.
    pub session: Session,
    /// Whether `session` is a stored one.
    pub session_present: bool,
    /// The identifier the broker assigned, when the client sent an empty one.
    pub assigned_client_id: Option<ClientId>,
    /// Final data of an enhanced authentication exchange.
    pub authentication_data: Option<Bytes>,
    /// User properties for the CONNACK.
    pub user_properties: Vec<UserProperty>,
    /// Response information, if the client asked for it.
    pub response_information: Option<MqttStr>,
}

impl Accept {
    /// Accepts with `session` and nothing else to say.
    pub fn new(session: Session, session_present: bool) -> Self {
        Self {
            session,
            session_present,
            assigned_client_id: None,
            authentication_data: None,
            user_properties: Vec::new(),
            response_information: None,
        }
    }
}

/// Something the broker must act on. New kinds of events may be added: ignore those you do
/// not know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A client sent CONNECT.
    Connect(ConnectRequest),
    /// The client continued an enhanced authentication exchange.
    AuthContinue {
        /// Authentication data.
        data: Option<Bytes>,
    },
    /// A connected client started re-authentication with the method it connected with.
    ReAuthenticate {
        /// Authentication data.
        data: Option<Bytes>,
    },
    /// A message from the client. For QoS 1 and 2, call [`ServerConnection::publish_ack`] once it
    /// is routed and durable wherever it must be: nothing is acknowledged before that.
    Publish(InboundPublish),
    /// Answer with [`ServerConnection::subscribe_ack`].
    Subscribe(Subscribe),
    /// Answer with [`ServerConnection::unsubscribe_ack`].
    Unsubscribe(Unsubscribe),
    /// A message to the client finished its flow: PUBACK, PUBCOMP, or a PUBREC refusing it;
    /// or, with 0x95, it was discarded because it no longer fits the client's maximum packet
    /// size when due for resending on a new connection [MQTT-3.1.2-25].
    Delivered {
        /// Its identifier, now free.
        packet_id: PacketId,
        /// The client's reason code.
        reason: ReasonCode,
        /// The message.
        delivery: Delivery,
    },
    /// A stored QoS 2 message went out under `packet_id` (see [`Delivery::store_seq`]). Record
    /// the pairing durably before the PUBLISH leaves: a restarted broker must resend the
    /// message under the same identifier, or the client would take it for a new one.
    Sent {
        /// Its identifier.
        packet_id: PacketId,
        /// Its [`Delivery::store_seq`].
        store_seq: u64,
    },
    /// A QoS 2 message to the client reached PUBREC; PUBREL was sent.
    Released {
        /// Its identifier.
        packet_id: PacketId,
        /// Its [`Delivery::store_seq`].
        store_seq: Option<u64>,
    },
    /// A QoS 2 message from the client was released by PUBREL; PUBCOMP was sent.
    InboundReleased {
        /// Its identifier.
        packet_id: PacketId,
    },
    /// The connection is over. Take the session with [`ServerConnection::take_session`].
    Closed {
        /// Why.
        reason: ReasonCode,
        /// Whether the client ended it (DISCONNECT or closed transport).
        by_client: bool,
    },
}

/// A broker call that does not fit the connection's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The call needs a pending CONNECT or authentication exchange.
    #[error("no connection attempt is pending")]
    NotConnecting,
    /// The call needs an established connection.
    #[error("the connection is not established")]
    NotConnected,
    /// Nothing awaits an answer under this packet identifier.
    #[error("nothing awaits an answer under packet identifier {0}")]
    UnknownPacketId(PacketId),
    /// No re-authentication is in progress.
    #[error("no re-authentication in progress")]
    NotReauthenticating,
    /// The client's CONNECT named no authentication method (MQTT 3 has none), so no AUTH may
    /// be sent to it.
    #[error("the client did not ask for enhanced authentication")]
    NoAuthenticationMethod,
}

/// A CONNECT being decided on.
#[derive(Debug)]
struct Handshake {
    deadline: Instant,
    connect: Box<Connect>,
    session_expiry: u32,
    keep_alive: u16,
    /// Packets the client sent after CONNECT, with their stream, replayed once it is accepted.
    early: VecDeque<(StreamId, Packet)>,
    /// Streams of early packets that were lost before the CONNECT was decided on, to be
    /// reported lost once those packets are replayed.
    lost: Vec<StreamId>,
}

/// An accepted connection.
#[derive(Debug)]
struct Established {
    flows: Flows,
    keep_alive: Option<Duration>,
    last_received: Instant,
    /// Boxed: most clients have none, and every connection pays the inline size.
    will: Option<Box<Will>>,
    auth_method: Option<MqttStr>,
    reauthenticating: bool,
    /// Session expiry granted in CONNECT; zero forbids a non-zero value at DISCONNECT.
    connect_session_expiry: u32,
    /// SUBSCRIBE and UNSUBSCRIBE received on a data stream and not yet answered: the stream
    /// their SUBACK or UNSUBACK goes on (the control stream for those not listed).
    pending_acks: SparseMap<PacketId, StreamId>,
    /// A Mosquitto bridge (see [`ConnectProperties::bridge`]): its subscriptions are No Local
    /// and Retain As Published.
    bridge: bool,
}

/// A connected [`ServerConnection`] with nothing going on, in its smallest form: what an idle
/// connection keeps while it waits for its client (see [`ServerConnection::park`]). It holds
/// the client's identity, keep alive, session expiry, will, limits and counters, and nothing
/// sized for a busy connection; [`Self::unpark`] gives the same connection back.
#[derive(Debug)]
pub struct ParkedConnection {
    config: Arc<ServerConfig>,
    flows: IdleFlows,
    keep_alive: Option<Duration>,
    last_received: Instant,
    will: Option<Box<Will>>,
    /// Boxed: most clients use none.
    auth_method: Option<Box<MqttStr>>,
    connect_session_expiry: u32,
    bridge: bool,
}

impl ParkedConnection {
    /// When [`ServerConnection::handle_timeout`] must next be called, as
    /// [`ServerConnection::poll_timeout`] says for the connection.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.keep_alive.map(|ka| self.last_received + ka * 3 / 2)
    }

    /// The connection again, as it was when it parked.
    pub fn unpark(self) -> ServerConnection {
        let Self {
            config,
            flows,
            keep_alive,
            last_received,
            will,
            auth_method,
            connect_session_expiry,
            bridge,
        } = self;
        ServerConnection {
            config,
            version: Some(flows.version),
            state: State::Connected(Box::new(Established {
                flows: flows.into_flows(),
                keep_alive,
                last_received,
                will,
                auth_method: auth_method.map(|m| *m),
                reauthenticating: false,
                connect_session_expiry,
                pending_acks: SparseMap::new(),
                bridge,
            })),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            unacked_at_close: SparseMap::new(),
        }
    }
}

#[derive(Debug)]
enum State {
    AwaitingConnect { deadline: Instant },
    Connecting(Box<Handshake>),
    Authenticating(Box<Handshake>),
    Connected(Box<Established>),
    Closed { session: Option<Box<Session>> },
}

/// The server's state machine for one client connection.
#[derive(Debug)]
pub struct ServerConnection {
    /// Shared: a broker's connections all have the same, and each would pay its size.
    config: Arc<ServerConfig>,
    version: Option<ProtocolVersion>,
    state: State,
    transmits: Transmits,
    events: VecDeque<(StreamId, Event)>,
    /// Messages handed to the broker and not yet acknowledged when the connection closed: the
    /// broker still owns them and may still call [`Self::publish_ack`].
    unacked_at_close: SparseMap<PacketId, QoS>,
}

impl ServerConnection {
    /// A connection whose transport was just established at `now`. Pass an
    /// `Arc<ServerConfig>` to share one configuration between connections.
    pub fn new(config: impl Into<Arc<ServerConfig>>, now: Instant) -> Self {
        let config = config.into();
        let deadline = now + config.connect_timeout;
        Self {
            config,
            version: None,
            state: State::AwaitingConnect { deadline },
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            unacked_at_close: SparseMap::new(),
        }
    }

    /// The protocol version, known once CONNECT has been decoded. Encode every transmit with it.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    /// The largest packet this side accepts; configure the packet reader with it.
    pub fn max_packet_size(&self) -> u32 {
        self.config.max_packet_size
    }

    /// Whether the connection is over. Send what [`Self::poll_transmit`] still returns, then
    /// close the transport.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed { .. })
    }

    /// Gives back the memory of empty queues and tables, for a connection that is idle and
    /// will stay so for a while: it then holds its state and nothing more. Changes nothing
    /// else; a busy connection that calls it allocates again on its next packets.
    pub fn compact(&mut self) {
        release_if_empty(&mut self.transmits);
        release_if_empty(&mut self.events);
        self.unacked_at_close.release_if_empty();
        if let State::Connected(e) = &mut self.state {
            e.pending_acks.release_if_empty();
            e.flows.compact();
        }
    }

    /// The connection in its smallest form ([`ParkedConnection`]), if it is connected and
    /// nothing is going on: nothing to send or to hand to the broker, no message in flight
    /// either way or queued, no SUBSCRIBE or UNSUBSCRIBE unanswered, no re-authentication, no
    /// topic alias set and no data stream known. Otherwise the connection itself, unchanged.
    /// Once it is parked, call nothing but [`ParkedConnection::poll_timeout`] until
    /// [`ParkedConnection::unpark`].
    pub fn park(mut self) -> Result<ParkedConnection, Self> {
        let idle = self.transmits.is_empty()
            && self.events.is_empty()
            && self.unacked_at_close.is_empty()
            && matches!(&self.state, State::Connected(e)
                if !e.reauthenticating && e.pending_acks.is_empty() && e.flows.is_idle());
        if !idle {
            return Err(self);
        }
        let e = match std::mem::replace(&mut self.state, State::Closed { session: None }) {
            State::Connected(e) => e,
            other => {
                self.state = other;
                return Err(self);
            }
        };
        // Named one by one, so that a field added later is not forgotten here.
        let Established {
            flows,
            keep_alive,
            last_received,
            will,
            auth_method,
            reauthenticating: _,
            connect_session_expiry,
            pending_acks: _,
            bridge,
        } = *e;
        Ok(ParkedConnection {
            config: self.config,
            flows: flows.into_idle(),
            keep_alive,
            last_received,
            will,
            auth_method: auth_method.map(Box::new),
            connect_session_expiry,
            bridge,
        })
    }

    /// Whether CONNACK has been sent with success and the connection is not yet closed.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Connected(_))
    }

    /// The session, while connected.
    pub fn session(&self) -> Option<&Session> {
        match &self.state {
            State::Connected(e) => Some(&e.flows.session),
            State::Closed { session } => session.as_deref(),
            _ => None,
        }
    }

    /// The client identifier, once CONNECT arrived (the requested one until the broker assigns).
    pub fn client_id(&self) -> Option<&ClientId> {
        match &self.state {
            State::Connecting(h) | State::Authenticating(h) => Some(&h.connect.client_id),
            State::Connected(e) => Some(e.flows.session.client_id()),
            State::Closed { session } => session.as_deref().map(Session::client_id),
            State::AwaitingConnect { .. } => None,
        }
    }

    /// The next packet to send, whatever its stream: for drivers with one stream.
    pub fn poll_transmit(&mut self) -> Option<Packet> {
        self.poll_transmit_tagged().map(|(_, packet)| packet)
    }

    /// The next packet to send and the stream it goes on.
    pub fn poll_transmit_tagged(&mut self) -> Option<(StreamId, Packet)> {
        let transmit = self.transmits.pop_front();
        if transmit.is_none() {
            release_if_empty(&mut self.transmits);
        }
        transmit
    }

    /// The next event for the broker.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.poll_event_tagged().map(|(_, event)| event)
    }

    /// The next event for the broker, with the stream of the packet that caused it
    /// ([`StreamId::CONTROL`] for events caused by timers or broker calls, and for those of a
    /// data stream [lost](Self::stream_lost) since: what the broker does for them counts as
    /// the control stream's, where their answers now go). For [`Event::Subscribe`] it is the
    /// stream to deliver that subscription's messages on (see [`Self::deliver_on`]); the hint
    /// belongs to this connection and must not be stored.
    pub fn poll_event_tagged(&mut self) -> Option<(StreamId, Event)> {
        let event = self.events.pop_front();
        if event.is_none() {
            release_if_empty(&mut self.events);
        }
        event
    }

    /// When [`Self::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::AwaitingConnect { deadline } => Some(*deadline),
            State::Connecting(h) | State::Authenticating(h) => Some(h.deadline),
            State::Connected(e) => e.keep_alive.map(|ka| e.last_received + ka * 3 / 2),
            State::Closed { .. } => None,
        }
    }

    /// Runs timers due at `now`: the CONNECT deadline and the 1.5 x keep alive rule
    /// [MQTT-3.1.2-24].
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(due) = self.poll_timeout() else {
            return;
        };
        if now < due {
            return;
        }
        match self.state {
            State::Connected(_) => self.close(now, ReasonCode::KeepAliveTimeout, true, true),
            _ => self.close(now, ReasonCode::MaximumConnectTime, false, false),
        }
    }

    /// A data stream ended (reset, stopped or finished) while the connection lives on; not a
    /// lost connection. Acknowledgements owed on it (PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK)
    /// go on the control stream; outgoing QoS 1 and 2 flows sent on it are resent on the
    /// control stream (PUBLISH with DUP, or PUBREL) and continue there; later deliveries for
    /// subscriptions made on it go on the control stream; its topic aliases are forgotten.
    /// Events of its packets not yet taken with [`Self::poll_event_tagged`] are the control
    /// stream's from now on, so that whatever the broker makes their answers wait for (a
    /// change to be durable) holds them on the control stream, and no subscription is tied to
    /// the stream that is gone. Losing the control stream loses the connection.
    pub fn stream_lost(&mut self, now: Instant, stream: StreamId) {
        if stream.is_control() {
            return self.connection_lost(now);
        }
        for (s, _) in self.events.iter_mut().filter(|(s, _)| *s == stream) {
            *s = StreamId::CONTROL;
        }
        match &mut self.state {
            State::Connected(e) => {
                e.flows.stream_lost(now, stream, &mut self.transmits);
                e.pending_acks.retain(|_, s| *s != stream);
                self.drain_flow_events(StreamId::CONTROL);
            }
            State::Connecting(h) | State::Authenticating(h)
                if h.early.iter().any(|(s, _)| *s == stream) && !h.lost.contains(&stream) =>
            {
                h.lost.push(stream);
            }
            _ => {}
        }
    }

    /// The transport failed or the peer closed it.
    pub fn connection_lost(&mut self, now: Instant) {
        if !self.is_closed() {
            self.close_inner(now, ReasonCode::UnspecifiedError, false, true, true);
        }
    }

    /// A packet could not be decoded: answer with CONNACK or DISCONNECT and close
    /// [MQTT-4.13.1-1].
    pub fn handle_decode_error(&mut self, now: Instant, error: &DecodeError) {
        if self.is_closed() {
            return;
        }
        let reason = error.reason_code();
        match &self.state {
            State::AwaitingConnect { .. } => {
                if let Some(version) = error.connect_version() {
                    self.version = Some(version);
                    self.send_connack_error(reason);
                } else if matches!(
                    error,
                    DecodeError::UnsupportedProtocolLevel(_) | DecodeError::InvalidProtocolName
                ) {
                    // Whatever the level, higher or lower: a client whose version the server
                    // does not speak gets the 3.1.1 return code 0x01 [MQTT-3.1.2-2], a format
                    // every version can read (as Mosquitto answers).
                    self.version = Some(ProtocolVersion::V3_1_1);
                    self.send_connack_error(reason);
                }
                self.close(now, reason, false, false);
            }
            _ => self.close(now, reason, true, true),
        }
    }

    /// Handles one packet from the client, on the control stream.
    pub fn handle_packet(&mut self, now: Instant, packet: Packet) {
        self.handle_packet_on(now, StreamId::CONTROL, packet);
    }

    /// Handles one packet the client sent on `stream`.
    pub fn handle_packet_on(&mut self, now: Instant, stream: StreamId, packet: Packet) {
        match &mut self.state {
            State::AwaitingConnect { .. } => match packet {
                Packet::Connect(connect) => self.on_connect(now, connect),
                _ => self.close(now, ReasonCode::ProtocolError, false, false),
            },
            State::Connecting(h) | State::Authenticating(h) => match packet {
                Packet::Auth(auth) => self.on_handshake_auth(now, auth),
                Packet::Connect(_) => self.close(now, ReasonCode::ProtocolError, false, false),
                other => {
                    if h.early.len() >= MAX_EARLY_PACKETS {
                        self.close(now, ReasonCode::QuotaExceeded, false, false);
                    } else {
                        h.early.push_back((stream, other));
                    }
                }
            },
            State::Connected(e) => {
                e.last_received = now;
                self.on_established_packet(now, stream, packet);
            }
            State::Closed { .. } => {}
        }
    }

    fn on_connect(&mut self, now: Instant, mut connect: Box<Connect>) {
        // The identifier lives as long as the session; as a slice of the packet it would keep
        // the whole CONNECT alive with it.
        connect.client_id = connect.client_id.detached();
        let version = connect.protocol;
        self.version = Some(version);
        let config = &self.config;
        if connect.client_id.is_empty()
            && (version == ProtocolVersion::V3_1 || !connect.clean_start && !version.is_v5())
        {
            // [MQTT-3.1.3-8]: a 3.1.1 client with an empty id must ask for a clean session.
            return self.refuse_connect(now, ReasonCode::ClientIdentifierNotValid);
        }
        let props = &connect.properties;
        if props.authentication_data.is_some() && props.authentication_method.is_none() {
            return self.refuse_connect(now, ReasonCode::ProtocolError);
        }
        if let Some(will) = &connect.will {
            if will.qos > config.maximum_qos {
                // [MQTT-3.2.2-12]
                return self.refuse_connect(now, ReasonCode::QoSNotSupported);
            }
            if will.retain && !config.retain_available {
                // [MQTT-3.2.2-13]
                return self.refuse_connect(now, ReasonCode::RetainNotSupported);
            }
        }
        let mut keep_alive = connect.keep_alive;
        if config.max_keepalive > 0 && (keep_alive > config.max_keepalive || keep_alive == 0) {
            if !version.is_v5() && keep_alive > config.max_keepalive {
                // MQTT 3 cannot tell the client to use another keep alive; refuse as
                // Mosquitto does rather than disconnect it later.
                return self.refuse_connect(now, ReasonCode::ClientIdentifierNotValid);
            }
            if version.is_v5() {
                keep_alive = config.max_keepalive;
            }
        }
        let session_expiry = if version.is_v5() {
            props
                .session_expiry_interval
                .unwrap_or(0)
                .min(config.max_session_expiry)
        } else if connect.clean_start {
            0
        } else {
            config.v3_session_expiry
        };
        let deadline = match &self.state {
            State::AwaitingConnect { deadline } => *deadline,
            _ => now + config.connect_timeout,
        };
        self.events.push_back((
            StreamId::CONTROL,
            Event::Connect(ConnectRequest {
                connect: connect.clone(),
                session_expiry_interval: session_expiry,
                keep_alive,
            }),
        ));
        self.state = State::Connecting(Box::new(Handshake {
            deadline,
            connect,
            session_expiry,
            keep_alive,
            early: VecDeque::new(),
            lost: Vec::new(),
        }));
    }

    /// Refuses a CONNECT the broker never saw: CONNACK with `reason`, then close. (`reject`
    /// only answers a CONNECT that reached the broker.)
    fn refuse_connect(&mut self, now: Instant, reason: ReasonCode) {
        self.send_connack_error(reason);
        self.close(now, reason, false, false);
    }

    fn on_handshake_auth(&mut self, now: Instant, auth: Auth) {
        let State::Authenticating(h) = &self.state else {
            return self.close(now, ReasonCode::ProtocolError, false, false);
        };
        let method_matches =
            auth.properties.authentication_method == h.connect.properties.authentication_method;
        if auth.reason != ReasonCode::ContinueAuthentication || !method_matches {
            return self.close(now, ReasonCode::ProtocolError, false, false);
        }
        let State::Authenticating(h) =
            std::mem::replace(&mut self.state, State::Closed { session: None })
        else {
            return;
        };
        self.state = State::Connecting(h);
        self.events.push_back((
            StreamId::CONTROL,
            Event::AuthContinue {
                data: auth.properties.authentication_data,
            },
        ));
    }

    /// Sends an AUTH packet continuing enhanced authentication: during CONNECT, or during a
    /// re-authentication the client started. Only a client whose CONNECT named an
    /// authentication method gets AUTH.
    pub fn auth_continue(&mut self, data: Option<Bytes>) -> Result<(), StateError> {
        match std::mem::replace(&mut self.state, State::Closed { session: None }) {
            State::Connecting(h)
                if !h.connect.protocol.is_v5()
                    || h.connect.properties.authentication_method.is_none() =>
            {
                self.state = State::Connecting(h);
                Err(StateError::NoAuthenticationMethod)
            }
            State::Connecting(h) => {
                let method = h.connect.properties.authentication_method.clone();
                self.state = State::Authenticating(h);
                self.transmits.push_back(control(auth_packet(
                    ReasonCode::ContinueAuthentication,
                    method,
                    data,
                )));
                Ok(())
            }
            State::Connected(e) if e.reauthenticating => {
                let method = e.auth_method.clone();
                self.state = State::Connected(e);
                self.transmits.push_back(control(auth_packet(
                    ReasonCode::ContinueAuthentication,
                    method,
                    data,
                )));
                Ok(())
            }
            other => {
                self.state = other;
                Err(StateError::NotConnecting)
            }
        }
    }

    /// Completes a re-authentication with success.
    pub fn reauth_success(&mut self, data: Option<Bytes>) -> Result<(), StateError> {
        let State::Connected(e) = &mut self.state else {
            return Err(StateError::NotConnected);
        };
        if !e.reauthenticating {
            return Err(StateError::NotReauthenticating);
        }
        e.reauthenticating = false;
        let method = e.auth_method.clone();
        self.transmits
            .push_back(control(auth_packet(ReasonCode::Success, method, data)));
        Ok(())
    }

    /// Accepts the pending CONNECT: sends CONNACK, then resumes the session's flows.
    pub fn accept(&mut self, now: Instant, accept: Accept) -> Result<(), StateError> {
        let h = match std::mem::replace(&mut self.state, State::Closed { session: None }) {
            State::Connecting(h) | State::Authenticating(h) => h,
            other => {
                self.state = other;
                return Err(StateError::NotConnecting);
            }
        };
        let Handshake {
            connect,
            session_expiry,
            keep_alive,
            early,
            lost,
            ..
        } = *h;
        let version = connect.protocol;
        let config = &self.config;
        let mut session = accept.session;
        session.set_expiry_interval(session_expiry);
        session.resumed();

        let cp = &connect.properties;
        let mut props = ConnAckProperties::default();
        if version.is_v5() {
            if cp.session_expiry_interval.unwrap_or(0) != session_expiry {
                props.session_expiry_interval = Some(session_expiry);
            }
            props.receive_maximum =
                NonZeroU16::new(config.receive_maximum).filter(|r| r.get() != u16::MAX);
            props.maximum_qos =
                (config.maximum_qos != QoS::ExactlyOnce).then_some(config.maximum_qos);
            props.retain_available = (!config.retain_available).then_some(false);
            props.maximum_packet_size = NonZeroU32::new(config.max_packet_size);
            props.assigned_client_identifier = accept.assigned_client_id;
            props.topic_alias_maximum =
                (config.topic_alias_maximum > 0).then_some(config.topic_alias_maximum);
            props.wildcard_subscription_available =
                (!config.wildcard_subscription_available).then_some(false);
            props.subscription_identifiers_available =
                (!config.subscription_identifiers_available).then_some(false);
            props.shared_subscription_available =
                (!config.shared_subscription_available).then_some(false);
            props.server_keep_alive = (keep_alive != connect.keep_alive).then_some(keep_alive);
            props.response_information = accept.response_information;
            props.user_properties = accept.user_properties;
            if cp.authentication_method.is_some() {
                props.authentication_method = cp.authentication_method.clone();
                props.authentication_data = accept.authentication_data;
            }
        }
        self.transmits.push_back(control(Packet::ConnAck(ConnAck {
            session_present: accept.session_present,
            reason: ReasonCode::Success,
            properties: props,
        })));

        let client_receive_maximum = cp.receive_maximum.map_or(u16::MAX, NonZeroU16::get);
        let local = LocalLimits {
            receive_maximum: config.receive_maximum,
            topic_alias_maximum: if version.is_v5() {
                config.topic_alias_maximum
            } else {
                0
            },
            maximum_qos: config.maximum_qos,
            retain_available: config.retain_available,
        };
        let peer = PeerLimits {
            receive_maximum: client_receive_maximum
                .min(config.max_inflight_messages)
                .max(1),
            maximum_packet_size: cp.maximum_packet_size.map_or(u32::MAX, NonZeroU32::get),
            topic_alias_maximum: cp.topic_alias_maximum.unwrap_or(0),
            // Clients announce no such limits.
            maximum_qos: QoS::ExactlyOnce,
            retain_available: true,
        };
        let mut flows = Flows::new(version, session, local, peer);
        flows.resume(now, &mut self.transmits);
        let connect = *connect;
        self.state = State::Connected(Box::new(Established {
            flows,
            keep_alive: (keep_alive > 0).then(|| Duration::from_secs(keep_alive.into())),
            last_received: now,
            will: connect.will.map(Box::new),
            auth_method: connect.properties.authentication_method,
            reauthenticating: false,
            connect_session_expiry: session_expiry,
            pending_acks: SparseMap::new(),
            bridge: connect.properties.bridge && !version.is_v5(),
        }));
        self.drain_flow_events(StreamId::CONTROL);
        for (stream, packet) in early {
            if self.is_closed() {
                break;
            }
            self.handle_packet_on(now, stream, packet);
        }
        for stream in lost {
            self.stream_lost(now, stream);
        }
        Ok(())
    }

    /// Refuses the pending CONNECT, or fails a re-authentication, with `reason`.
    pub fn reject(&mut self, now: Instant, reason: ReasonCode) -> Result<(), StateError> {
        match self.state {
            State::Connecting(_) | State::Authenticating(_) => {
                self.send_connack_error(reason);
                self.close(now, reason, false, false);
                Ok(())
            }
            State::Connected(_) => {
                self.close(now, reason, true, true);
                Ok(())
            }
            _ => Err(StateError::NotConnecting),
        }
    }

    fn send_connack_error(&mut self, reason: ReasonCode) {
        let reason = if reason.valid_for(ReasonContext::ConnAck) && reason.is_error() {
            reason
        } else {
            ReasonCode::UnspecifiedError
        };
        self.transmits.push_back(control(Packet::ConnAck(ConnAck {
            session_present: false,
            reason,
            properties: ConnAckProperties::default(),
        })));
    }

    fn on_established_packet(&mut self, now: Instant, stream: StreamId, packet: Packet) {
        let State::Connected(e) = &mut self.state else {
            return;
        };
        e.flows.note_stream(stream);
        let out = &mut self.transmits;
        match packet {
            Packet::Publish(publish) if !publish.properties.subscription_identifiers.is_empty() => {
                // [MQTT-3.3.4-6]: only the server sends subscription identifiers.
                return self.close(now, ReasonCode::ProtocolError, true, true);
            }
            Packet::Publish(publish) => match e.flows.on_publish(now, stream, publish, out) {
                Ok(Some(p)) => self.events.push_back((stream, Event::Publish(p))),
                Ok(None) => {}
                Err(v) => return self.violation(now, &v),
            },
            Packet::PubAck(ack) => e.flows.on_puback(now, ack, out),
            Packet::PubRec(rec) => e.flows.on_pubrec(now, stream, rec, out),
            Packet::PubRel(rel) => e.flows.on_pubrel(stream, rel, out),
            Packet::PubComp(comp) => e.flows.on_pubcomp(now, comp, out),
            Packet::Subscribe(mut sub) => {
                if sub
                    .filters
                    .iter()
                    .any(|s| s.options.no_local && s.filter.share().is_some())
                {
                    // [MQTT-3.8.3-4]
                    return self.close(now, ReasonCode::ProtocolError, true, true);
                }
                if sub.properties.subscription_identifier.is_some()
                    && !self.config.subscription_identifiers_available
                {
                    return self.close(
                        now,
                        ReasonCode::SubscriptionIdentifiersNotSupported,
                        true,
                        true,
                    );
                }
                if !stream.is_control() {
                    e.pending_acks.insert(sub.packet_id, stream);
                }
                if e.bridge {
                    // What Mosquitto does for its bridges: their own messages do not come
                    // back, and retained ones keep their flag. A shared subscription cannot be
                    // No Local [MQTT-3.8.3-4].
                    for s in sub
                        .filters
                        .iter_mut()
                        .filter(|s| s.filter.share().is_none())
                    {
                        s.options.no_local = true;
                        s.options.retain_as_published = true;
                    }
                }
                self.events.push_back((stream, Event::Subscribe(sub)));
            }
            Packet::Unsubscribe(unsub) => {
                if !stream.is_control() {
                    e.pending_acks.insert(unsub.packet_id, stream);
                }
                self.events.push_back((stream, Event::Unsubscribe(unsub)));
            }
            Packet::PingReq => out.push_back((stream, Packet::PingResp)),
            Packet::Disconnect(d) => return self.on_disconnect(now, d),
            Packet::Auth(auth) => return self.on_reauth(now, stream, auth),
            Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp => {
                // [MQTT-3.1.0-2] a second CONNECT; the others only flow server to client.
                return self.close(now, ReasonCode::ProtocolError, true, true);
            }
        }
        self.drain_flow_events(stream);
    }

    fn violation(&mut self, now: Instant, v: &Violation) {
        self.close(now, v.reason_code(), true, true);
    }

    fn on_disconnect(&mut self, now: Instant, d: Disconnect) {
        let State::Connected(e) = &mut self.state else {
            return;
        };
        if let Some(expiry) = d.properties.session_expiry_interval {
            if e.connect_session_expiry == 0 && expiry != 0 {
                // [MQTT-3.14.2-2]: not a valid DISCONNECT.
                return self.close(now, ReasonCode::ProtocolError, true, true);
            }
            e.flows
                .session
                .set_expiry_interval(expiry.min(self.config.max_session_expiry));
        }
        let publish_will = d.reason != ReasonCode::Success;
        self.close_inner(now, d.reason, false, publish_will, true);
    }

    fn on_reauth(&mut self, now: Instant, stream: StreamId, auth: Auth) {
        let State::Connected(e) = &mut self.state else {
            return;
        };
        let expected = if e.reauthenticating {
            ReasonCode::ContinueAuthentication
        } else {
            ReasonCode::ReAuthenticate
        };
        if e.auth_method.is_none()
            || auth.properties.authentication_method != e.auth_method
            || auth.reason != expected
        {
            return self.close(now, ReasonCode::ProtocolError, true, true);
        }
        let data = auth.properties.authentication_data;
        if e.reauthenticating {
            self.events
                .push_back((stream, Event::AuthContinue { data }));
        } else {
            e.reauthenticating = true;
            self.events
                .push_back((stream, Event::ReAuthenticate { data }));
        }
    }

    /// Acknowledges a QoS 1 or 2 message from the client once it is safe (routed and durable
    /// wherever it must be): PUBACK or PUBREC with `reason`.
    ///
    /// Call it even if the connection closed in the meantime, before taking the session: nothing
    /// is sent then, but a QoS 2 message is recorded in the session as received, so that the
    /// client's retransmission on its next connection is answered with PUBREC instead of being
    /// delivered a second time [MQTT-4.3.3-9].
    pub fn publish_ack(&mut self, id: PacketId, reason: ReasonCode) -> Result<(), StateError> {
        let v5 = self.version.is_some_and(ProtocolVersion::is_v5);
        let reason = puback_reason(v5, reason);
        let e = match &mut self.state {
            State::Connected(e) => e,
            State::Closed {
                session: Some(session),
            } => {
                return ack_after_close(&mut self.unacked_at_close, session, id, reason)
                    .then_some(())
                    .ok_or(StateError::UnknownPacketId(id));
            }
            _ => return Err(StateError::NotConnected),
        };
        if e.flows.ack_inbound(id, reason, &mut self.transmits) {
            Ok(())
        } else {
            Err(StateError::UnknownPacketId(id))
        }
    }

    /// Answers a SUBSCRIBE with one reason code per filter, on the stream the SUBSCRIBE came
    /// on. A code SUBACK may not carry is sent as 0x80 if it reports a failure, 0x00 otherwise.
    pub fn subscribe_ack(
        &mut self,
        packet_id: PacketId,
        reasons: Vec<ReasonCode>,
    ) -> Result<(), StateError> {
        let stream = self.ack_stream(packet_id)?;
        let reasons = reasons
            .into_iter()
            .map(|r| reason_for(ReasonContext::SubAck, r))
            .collect();
        self.transmits.push_back((
            stream,
            Packet::SubAck(SubAck {
                packet_id,
                properties: AckProperties::default(),
                reasons,
            }),
        ));
        Ok(())
    }

    /// Answers an UNSUBSCRIBE with one reason code per filter (ignored by MQTT 3), on the
    /// stream the UNSUBSCRIBE came on; a code UNSUBACK may not carry is sent as 0x80 if it
    /// reports a failure, 0x00 otherwise.
    pub fn unsubscribe_ack(
        &mut self,
        packet_id: PacketId,
        reasons: Vec<ReasonCode>,
    ) -> Result<(), StateError> {
        let stream = self.ack_stream(packet_id)?;
        let reasons = if self.version.is_some_and(ProtocolVersion::is_v5) {
            reasons
                .into_iter()
                .map(|r| reason_for(ReasonContext::UnsubAck, r))
                .collect()
        } else {
            Vec::new()
        };
        self.transmits.push_back((
            stream,
            Packet::UnsubAck(UnsubAck {
                packet_id,
                properties: AckProperties::default(),
                reasons,
            }),
        ));
        Ok(())
    }

    /// The stream that owes the answer to SUBSCRIBE or UNSUBSCRIBE `packet_id`, now answered.
    fn ack_stream(&mut self, packet_id: PacketId) -> Result<StreamId, StateError> {
        let State::Connected(e) = &mut self.state else {
            return Err(StateError::NotConnected);
        };
        Ok(e.pending_acks
            .remove(&packet_id)
            .unwrap_or(StreamId::CONTROL))
    }

    /// Hands a message to the client on the control stream: sent now if its receive window
    /// allows, else queued. After the connection closed, the message is queued in the session
    /// until it is taken.
    pub fn deliver(&mut self, now: Instant, delivery: Delivery) -> Enqueued {
        self.deliver_on(now, StreamId::CONTROL, delivery)
    }

    /// Hands a message to the client on `stream`, the stream its subscription was made on (see
    /// [`Self::poll_event_tagged`]): as [`Self::deliver`], but sent on `stream` if the client
    /// has sent a packet on it and it was not lost since, else on the control stream. A flow
    /// keeps its stream for its PUBREL; a session resumed by a later connection sends
    /// everything on the control stream.
    pub fn deliver_on(&mut self, now: Instant, stream: StreamId, delivery: Delivery) -> Enqueued {
        let outcome = match &mut self.state {
            State::Connected(e) => e.flows.deliver(now, stream, delivery, &mut self.transmits),
            State::Closed { session: Some(s) } => s.enqueue(now, delivery),
            _ => Enqueued::NotConnected,
        };
        self.drain_flow_events(StreamId::CONTROL);
        outcome
    }

    /// Closes the connection from the server's side: DISCONNECT with `reason` for MQTT 5
    /// clients (0x8B on shutdown, 0x8E on takeover, ...). The will is published, as for any
    /// close the client did not ask for.
    pub fn disconnect(&mut self, now: Instant, reason: ReasonCode) {
        if !self.is_closed() {
            self.close(now, reason, true, true);
        }
    }

    /// After [`Event::Closed`]: the session, with its expiry clock and delayed will started.
    /// Drive it with [`Session::poll_timeout`] / [`Session::handle_timeout`]; an expiry of zero
    /// makes it due at once.
    pub fn take_session(&mut self) -> Option<Session> {
        match &mut self.state {
            State::Closed { session } => session.take().map(|s| *s),
            _ => None,
        }
    }

    fn close(
        &mut self,
        now: Instant,
        reason: ReasonCode,
        send_disconnect: bool,
        publish_will: bool,
    ) {
        self.close_inner(now, reason, send_disconnect, publish_will, false);
    }

    fn close_inner(
        &mut self,
        now: Instant,
        reason: ReasonCode,
        send_disconnect: bool,
        publish_will: bool,
        by_client: bool,
    ) {
        let previous = std::mem::replace(&mut self.state, State::Closed { session: None });
        let session = match previous {
            State::Connected(e) => {
                let Established {
                    mut flows, will, ..
                } = *e;
                self.unacked_at_close = flows.take_unacked();
                if send_disconnect && flows.version.is_v5() {
                    let reason = if reason.valid_for(ReasonContext::Disconnect) {
                        reason
                    } else {
                        ReasonCode::UnspecifiedError
                    };
                    self.transmits
                        .push_back(control(Packet::Disconnect(Disconnect::new(reason))));
                }
                let mut session = flows.session;
                let will = will.filter(|_| publish_will).map(|w| {
                    let delay = w.properties.will_delay_interval.unwrap_or(0);
                    (*w, delay)
                });
                session.disconnected(now, will);
                Some(Box::new(session))
            }
            _ => None,
        };
        self.state = State::Closed { session };
        self.events
            .push_back((StreamId::CONTROL, Event::Closed { reason, by_client }));
    }

    /// Passes on what the flows reported, as caused by a packet on `stream`.
    fn drain_flow_events(&mut self, stream: StreamId) {
        let State::Connected(e) = &mut self.state else {
            return;
        };
        while let Some(event) = e.flows.events.pop_front() {
            let event = match event {
                FlowEvent::Completed {
                    packet_id,
                    reason,
                    delivery,
                } => Event::Delivered {
                    packet_id,
                    reason,
                    delivery,
                },
                FlowEvent::Sent {
                    packet_id,
                    store_seq,
                } => Event::Sent {
                    packet_id,
                    store_seq,
                },
                FlowEvent::Released {
                    packet_id,
                    store_seq,
                } => Event::Released {
                    packet_id,
                    store_seq,
                },
                FlowEvent::InboundReleased { packet_id } => Event::InboundReleased { packet_id },
            };
            self.events.push_back((stream, event));
        }
    }
}

/// A packet for the control stream.
fn control(packet: Packet) -> (StreamId, Packet) {
    (StreamId::CONTROL, packet)
}

fn auth_packet(reason: ReasonCode, method: Option<MqttStr>, data: Option<Bytes>) -> Packet {
    Packet::Auth(Auth {
        reason,
        properties: AuthProperties {
            authentication_method: method,
            authentication_data: data,
            ..AuthProperties::default()
        },
    })
}

/// Frees an emptied queue's buffer: an idle connection then holds none, which matters when a
/// broker holds many thousands of them. A busy one reallocates once per burst.
fn release_if_empty<T>(queue: &mut VecDeque<T>) {
    if queue.is_empty() && queue.capacity() > 0 {
        *queue = VecDeque::new();
    }
}

#[cfg(test)]
mod size {
    use super::*;

    /// Every idle connection holds its `Established`: its size is paid per connection (864
    /// bytes before its maps became one pointer each while empty).
    #[test]
    fn an_established_connection_stays_small() {
        let size = size_of::<Established>();
        assert!(size <= 560, "Established is {size} bytes");
    }

    /// What a parked idle connection keeps instead of the whole machine and its `Established`
    /// (200 bytes on this toolchain: the session's identity, limits and counters are most).
    #[test]
    fn a_parked_connection_is_smaller_still() {
        let size = size_of::<ParkedConnection>();
        assert!(size <= 208, "ParkedConnection is {size} bytes");
    }
}
