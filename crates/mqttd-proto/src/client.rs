//! The client's side of a connection, used by `mqttd pub`, `mqttd sub`, `mqttd bench` and
//! bridges.
//!
//! ```text
//!   new(): CONNECT sent    CONNACK 0x00
//!   Connecting ------------------------> Connected --+--> Closed
//!     |    ^  \ AUTH 0x18 (event)             |       |
//!     |    |   v                              |       |
//!     |    Authenticating                     |       |
//!     +-- CONNACK >= 0x80 / timeout ----------+-------+
//! ```
//!
//! The application publishes, subscribes and disconnects through methods; the machine
//! allocates packet identifiers, obeys the server's receive maximum, maximum QoS, maximum
//! packet size and topic alias maximum, sends PINGREQ when the connection has been idle for the
//! keep alive, and reports what happened as [`Event`]s.
//!
//! Streams (MQTT over QUIC in multi-stream mode): everything travels on
//! [`StreamId::CONTROL`] unless the application names a data stream. The driver opens data
//! streams and announces them with [`ClientConnection::stream_opened`]; then
//! [`ClientConnection::publish_on`], [`ClientConnection::subscribe_on`] and
//! [`ClientConnection::unsubscribe_on`] send on them. Acknowledgements go on the stream of the
//! packet they answer, a QoS 2 flow's PUBREL on the stream of its PUBLISH, topic aliases are
//! per stream, packet identifiers per session; CONNECT, PINGREQ, DISCONNECT and AUTH always go
//! on the control stream. A data stream that is not open (yet, or any more) means the control
//! stream, and what is queued before CONNACK goes on the control stream.

use std::collections::{HashSet, VecDeque};
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec::DecodeError;
use crate::flow::{
    ack_after_close, FlowEvent, Flows, InboundPublish, LocalLimits, PeerLimits, Transmits,
};
use crate::message::{Delivery, Message};
use crate::packet::*;
use crate::reason::{puback_reason, reason_for, ReasonCode, ReasonContext};
use crate::session::{Enqueued, QueueLimits, Session};
use crate::sparse::SparseMap;
use crate::types::{ClientId, MqttStr, PacketId, ProtocolVersion, QoS, StreamId, TopicFilter};

/// How the client connects.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Protocol version to speak.
    pub version: ProtocolVersion,
    /// Client identifier; empty asks the server to assign one (MQTT 5, or clean 3.1.1).
    pub client_id: ClientId,
    /// Start a new session instead of resuming a stored one.
    pub clean_start: bool,
    /// Keep alive in seconds; 0 disables it.
    pub keep_alive: u16,
    /// User name.
    pub username: Option<MqttStr>,
    /// Password; before MQTT 5 it is only sent with a user name [MQTT-3.1.2-22].
    pub password: Option<Bytes>,
    /// Will message.
    pub will: Option<Will>,
    /// Session expiry interval requested (MQTT 5).
    pub session_expiry_interval: u32,
    /// QoS 1 and 2 messages the server may have unacknowledged towards this client.
    pub receive_maximum: u16,
    /// Largest packet this client accepts.
    pub max_packet_size: u32,
    /// Topic aliases the server may set towards this client.
    pub topic_alias_maximum: u16,
    /// Enhanced authentication method and initial data.
    pub authentication: Option<(MqttStr, Option<Bytes>)>,
    /// User properties sent in CONNECT.
    pub user_properties: Vec<UserProperty>,
    /// Limits on messages queued behind the server's receive window.
    pub queue_limits: QueueLimits,
    /// Acknowledge incoming QoS 1 and 2 messages as soon as they are reported. When false, the
    /// application calls [`ClientConnection::ack`] (e.g. after storing the message).
    pub auto_ack: bool,
    /// Time allowed for CONNACK, authentication included.
    pub connect_timeout: Duration,
    /// Announce a bridge between brokers as Mosquitto's bridges do (`try_private`): MQTT 3.1
    /// and 3.1.1 only, with the high bit of the protocol level (see
    /// [`ConnectProperties::bridge`]). A server that does not know the flag refuses the
    /// connection with return code 1 (unacceptable protocol version).
    pub bridge: bool,
}

impl ClientConfig {
    /// Defaults for `client_id`: MQTT 5, clean start, 60 s keep alive.
    pub fn new(client_id: ClientId) -> Self {
        Self {
            version: ProtocolVersion::V5,
            client_id,
            clean_start: true,
            keep_alive: 60,
            username: None,
            password: None,
            will: None,
            session_expiry_interval: 0,
            receive_maximum: u16::MAX,
            max_packet_size: MAX_REMAINING_LENGTH + 5,
            topic_alias_maximum: 0,
            authentication: None,
            user_properties: Vec::new(),
            queue_limits: QueueLimits {
                max_messages: 10_000,
                max_bytes: 0,
            },
            auto_ack: true,
            connect_timeout: Duration::from_secs(30),
            bridge: false,
        }
    }

    fn connect_packet(&self) -> Connect {
        let v5 = self.version.is_v5();
        let mut properties = ConnectProperties::default();
        if v5 {
            properties.session_expiry_interval =
                (self.session_expiry_interval > 0).then_some(self.session_expiry_interval);
            properties.receive_maximum =
                NonZeroU16::new(self.receive_maximum).filter(|r| r.get() != u16::MAX);
            properties.maximum_packet_size =
                NonZeroU32::new(self.max_packet_size).filter(|m| m.get() <= MAX_REMAINING_LENGTH);
            properties.topic_alias_maximum =
                (self.topic_alias_maximum > 0).then_some(self.topic_alias_maximum);
            properties.user_properties = self.user_properties.clone();
            if let Some((method, data)) = &self.authentication {
                properties.authentication_method = Some(method.clone());
                properties.authentication_data = data.clone();
            }
        } else {
            properties.bridge = self.bridge;
        }
        let mut will = self.will.clone();
        if !v5 {
            if let Some(w) = &mut will {
                w.properties = WillProperties::default();
            }
        }
        // Before 5.0 a password needs a user name [MQTT-3.1.2-22]; without one it is left out,
        // as Mosquitto's client library does, rather than sending a malformed CONNECT.
        let password = self
            .password
            .clone()
            .filter(|_| v5 || self.username.is_some());
        Connect {
            protocol: self.version,
            clean_start: self.clean_start,
            keep_alive: self.keep_alive,
            client_id: self.client_id.clone(),
            will,
            username: self.username.clone(),
            password,
            properties,
        }
    }
}

/// Something the application must know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The server accepted the connection.
    Connected(ConnAck),
    /// The server refused the connection; [`Event::Closed`] follows.
    Rejected(ConnAck),
    /// The server continues enhanced authentication; answer with
    /// [`ClientConnection::auth_continue`].
    AuthChallenge {
        /// Authentication data.
        data: Option<Bytes>,
    },
    /// A re-authentication succeeded.
    ReAuthenticated {
        /// Final authentication data.
        data: Option<Bytes>,
    },
    /// A message from the server.
    Publish(InboundPublish),
    /// A QoS 1 or 2 message finished: PUBACK, PUBCOMP, or a PUBREC refusing it; or, with 0x95,
    /// it was discarded because it no longer fits the server's maximum packet size when due
    /// for resending on a new connection [MQTT-3.1.2-25].
    Delivered {
        /// Its identifier, now free.
        packet_id: PacketId,
        /// The server's reason code.
        reason: ReasonCode,
        /// The message.
        delivery: Delivery,
    },
    /// The answer to a SUBSCRIBE.
    SubAck(SubAck),
    /// The answer to an UNSUBSCRIBE.
    UnsubAck(UnsubAck),
    /// The connection is over.
    Closed {
        /// Why.
        reason: ReasonCode,
        /// Whether the server ended it (DISCONNECT, refusal, or closed transport).
        by_server: bool,
    },
}

/// An application call that does not fit the connection's state or the server's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The connection is closed.
    #[error("the connection is closed")]
    Closed,
    /// The call needs an established connection.
    #[error("the connection is not established")]
    NotConnected,
    /// The server's maximum QoS is lower [MQTT-3.2.2-11].
    #[error("the server accepts at most QoS {0:?}")]
    QoSNotSupported(QoS),
    /// The server does not support retained messages [MQTT-3.2.2-14].
    #[error("the server does not support retained messages")]
    RetainNotSupported,
    /// Every packet identifier is in use.
    #[error("no packet identifier available")]
    NoPacketId,
    /// Nothing awaits an acknowledgement under this identifier.
    #[error("nothing awaits an acknowledgement under packet identifier {0}")]
    UnknownPacketId(PacketId),
    /// No authentication exchange is in progress.
    #[error("no authentication exchange in progress")]
    NotAuthenticating,
    /// SUBSCRIBE and UNSUBSCRIBE need at least one topic filter.
    #[error("no topic filters given")]
    NoTopicFilters,
}

#[derive(Debug)]
struct Handshake {
    deadline: Instant,
    session: Session,
}

#[derive(Debug)]
struct Established {
    flows: Flows,
    keep_alive: Option<Duration>,
    last_received: Instant,
    last_sent: Instant,
    ping_sent: Option<Instant>,
    server_maximum_qos: QoS,
    server_retain_available: bool,
    reauthenticating: bool,
}

#[derive(Debug)]
enum State {
    Connecting(Box<Handshake>),
    Authenticating(Box<Handshake>),
    Connected(Box<Established>),
    Closed { session: Option<Box<Session>> },
}

/// The client's state machine for one connection.
#[derive(Debug)]
pub struct ClientConnection {
    config: ClientConfig,
    state: State,
    transmits: Transmits,
    events: VecDeque<Event>,
    /// SUBSCRIBE and UNSUBSCRIBE identifiers awaiting their answer.
    pending_control: HashSet<PacketId>,
    next_control_id: PacketId,
    /// Messages reported to the application and not yet acknowledged when the connection
    /// closed: the application may still call [`Self::ack`] for them.
    unacked_at_close: SparseMap<PacketId, QoS>,
    /// Data streams opened before CONNACK, made known to the flows once connected.
    opened_early: HashSet<StreamId>,
}

impl ClientConnection {
    /// Starts a connection at `now`: CONNECT is the first transmit. `session` is a session
    /// kept from an earlier connection to resume; it is discarded on clean start.
    pub fn new(config: ClientConfig, session: Option<Session>, now: Instant) -> Self {
        let session = match session {
            Some(s) if !config.clean_start => s,
            _ => Session::new(
                config.client_id.clone(),
                config.session_expiry_interval,
                config.queue_limits,
            ),
        };
        let mut transmits = VecDeque::new();
        transmits.push_back((
            StreamId::CONTROL,
            Packet::Connect(Box::new(config.connect_packet())),
        ));
        let deadline = now + config.connect_timeout;
        Self {
            config,
            state: State::Connecting(Box::new(Handshake { deadline, session })),
            transmits,
            events: VecDeque::new(),
            pending_control: HashSet::new(),
            next_control_id: PacketId::MIN,
            unacked_at_close: SparseMap::new(),
            opened_early: HashSet::new(),
        }
    }

    /// The protocol version; encode every transmit with it.
    pub fn version(&self) -> ProtocolVersion {
        self.config.version
    }

    /// Whether CONNACK accepted the connection and it is not yet closed.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Connected(_))
    }

    /// Whether the connection is over.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed { .. })
    }

    /// The session.
    pub fn session(&self) -> Option<&Session> {
        match &self.state {
            State::Connecting(h) | State::Authenticating(h) => Some(&h.session),
            State::Connected(e) => Some(&e.flows.session),
            State::Closed { session } => session.as_deref(),
        }
    }

    /// The largest packet this client accepts; configure the packet reader with it.
    pub fn max_packet_size(&self) -> u32 {
        self.config.max_packet_size
    }

    /// The next packet to send, whatever its stream; `now` feeds the keep alive's idle clock.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Packet> {
        self.poll_transmit_tagged(now).map(|(_, packet)| packet)
    }

    /// The next packet to send and the stream it goes on: acknowledgements go on the stream
    /// of the packet they answer, everything the client starts on the control stream.
    pub fn poll_transmit_tagged(&mut self, now: Instant) -> Option<(StreamId, Packet)> {
        let transmit = self.transmits.pop_front()?;
        if let State::Connected(e) = &mut self.state {
            e.last_sent = now;
        }
        Some(transmit)
    }

    /// The driver opened data stream `stream`: publications and subscriptions for it may go
    /// on it from now on. (A stream the server opens is known once a packet arrives on it.)
    /// The control stream is always open.
    pub fn stream_opened(&mut self, stream: StreamId) {
        if stream.is_control() {
            return;
        }
        match &mut self.state {
            State::Connected(e) => e.flows.note_stream(stream),
            State::Connecting(_) | State::Authenticating(_) => {
                self.opened_early.insert(stream);
            }
            State::Closed { .. } => {}
        }
    }

    /// The stream a packet the application starts for `stream` goes on: `stream` if it is
    /// open, else the control stream.
    fn live(&self, stream: StreamId) -> StreamId {
        match &self.state {
            State::Connected(e) => e.flows.live(stream),
            _ => StreamId::CONTROL,
        }
    }

    /// A data stream ended while the connection lives on: acknowledgements owed on it go on
    /// the control stream, flows sent on it are resent there, its topic aliases are forgotten.
    /// Losing the control stream loses the connection.
    pub fn stream_lost(&mut self, now: Instant, stream: StreamId) {
        if stream.is_control() {
            return self.connection_lost(now);
        }
        self.opened_early.remove(&stream);
        if let State::Connected(e) = &mut self.state {
            e.flows.stream_lost(now, stream, &mut self.transmits);
            self.drain_flow_events();
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Connecting(h) | State::Authenticating(h) => Some(h.deadline),
            State::Connected(e) => {
                let ka = e.keep_alive?;
                Some(match e.ping_sent {
                    Some(sent) => sent + ka,
                    None => e.last_sent.min(e.last_received) + ka,
                })
            }
            State::Closed { .. } => None,
        }
    }

    /// Runs timers due at `now`: the CONNACK deadline, PINGREQ after a keep alive of
    /// idleness, and the close when PINGRESP does not come within another keep alive.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(due) = self.poll_timeout() else {
            return;
        };
        if now < due {
            return;
        }
        match &mut self.state {
            State::Connected(e) if e.ping_sent.is_none() => {
                e.ping_sent = Some(now);
                self.transmits
                    .push_back((StreamId::CONTROL, Packet::PingReq));
            }
            State::Connected(_) => self.close(now, ReasonCode::KeepAliveTimeout, true, false),
            _ => self.close(now, ReasonCode::MaximumConnectTime, false, false),
        }
    }

    /// The transport failed or the server closed it.
    pub fn connection_lost(&mut self, now: Instant) {
        if !self.is_closed() {
            self.close(now, ReasonCode::UnspecifiedError, false, true);
        }
    }

    /// A packet from the server could not be decoded: DISCONNECT (MQTT 5) and close.
    pub fn handle_decode_error(&mut self, now: Instant, error: &DecodeError) {
        if !self.is_closed() {
            self.close(now, error.reason_code(), true, false);
        }
    }

    /// Handles one packet from the server, on the control stream.
    pub fn handle_packet(&mut self, now: Instant, packet: Packet) {
        self.handle_packet_on(now, StreamId::CONTROL, packet);
    }

    /// Handles one packet the server sent on `stream`.
    pub fn handle_packet_on(&mut self, now: Instant, stream: StreamId, packet: Packet) {
        match &mut self.state {
            State::Connecting(_) | State::Authenticating(_) => match packet {
                Packet::ConnAck(ack) => self.on_connack(now, ack),
                Packet::Auth(auth) => self.on_handshake_auth(now, auth),
                _ => self.close(now, ReasonCode::ProtocolError, false, false),
            },
            State::Connected(e) => {
                e.last_received = now;
                e.ping_sent = None;
                self.on_established_packet(now, stream, packet);
            }
            State::Closed { .. } => {}
        }
    }

    fn on_handshake_auth(&mut self, now: Instant, auth: Auth) {
        let method = self.config.authentication.as_ref().map(|(m, _)| m);
        if auth.reason != ReasonCode::ContinueAuthentication
            || method.is_none()
            || auth.properties.authentication_method.as_ref() != method
        {
            return self.close(now, ReasonCode::ProtocolError, true, false);
        }
        self.state = match std::mem::replace(&mut self.state, State::Closed { session: None }) {
            State::Connecting(h) | State::Authenticating(h) => State::Authenticating(h),
            other => other,
        };
        self.events.push_back(Event::AuthChallenge {
            data: auth.properties.authentication_data,
        });
    }

    fn on_connack(&mut self, now: Instant, ack: ConnAck) {
        if ack.reason.is_error() {
            self.events.push_back(Event::Rejected(ack.clone()));
            return self.close(now, ack.reason, false, true);
        }
        let (State::Connecting(h) | State::Authenticating(h)) =
            std::mem::replace(&mut self.state, State::Closed { session: None })
        else {
            return;
        };
        let mut session = h.session;
        let p = &ack.properties;
        if let Some(id) = &p.assigned_client_identifier {
            session.set_client_id(id.clone());
        }
        if !ack.session_present {
            // The server has no session state for us [MQTT-3.2.2-5].
            session.reset_in_flight();
        }
        if let Some(expiry) = p.session_expiry_interval {
            session.set_expiry_interval(expiry);
        }
        session.resumed();
        let v5 = self.config.version.is_v5();
        let keep_alive = p.server_keep_alive.unwrap_or(self.config.keep_alive);
        let local = LocalLimits {
            receive_maximum: self.config.receive_maximum,
            topic_alias_maximum: if v5 {
                self.config.topic_alias_maximum
            } else {
                0
            },
            maximum_qos: QoS::ExactlyOnce,
            retain_available: true,
        };
        let peer = PeerLimits {
            receive_maximum: p.receive_maximum.map_or(u16::MAX, NonZeroU16::get),
            maximum_packet_size: p.maximum_packet_size.map_or(u32::MAX, NonZeroU32::get),
            topic_alias_maximum: p.topic_alias_maximum.unwrap_or(0),
            maximum_qos: p.maximum_qos.unwrap_or(QoS::ExactlyOnce),
            retain_available: p.retain_available.unwrap_or(true),
        };
        let mut flows = Flows::new(self.config.version, session, local, peer);
        for stream in self.opened_early.drain() {
            flows.note_stream(stream);
        }
        flows.resume(now, &mut self.transmits);
        self.state = State::Connected(Box::new(Established {
            flows,
            keep_alive: (keep_alive > 0).then(|| Duration::from_secs(keep_alive.into())),
            last_received: now,
            last_sent: now,
            ping_sent: None,
            server_maximum_qos: p.maximum_qos.unwrap_or(QoS::ExactlyOnce),
            server_retain_available: p.retain_available.unwrap_or(true),
            reauthenticating: false,
        }));
        self.events.push_back(Event::Connected(ack));
        self.drain_flow_events();
    }

    fn on_established_packet(&mut self, now: Instant, stream: StreamId, packet: Packet) {
        let State::Connected(e) = &mut self.state else {
            return;
        };
        e.flows.note_stream(stream);
        let out = &mut self.transmits;
        match packet {
            Packet::Publish(publish) => match e.flows.on_publish(now, stream, publish, out) {
                Ok(Some(p)) => {
                    if self.config.auto_ack {
                        if let Some(id) = p.packet_id {
                            e.flows.ack_inbound(id, ReasonCode::Success, out);
                        }
                    }
                    self.events.push_back(Event::Publish(p));
                }
                Ok(None) => {}
                Err(v) => return self.close(now, v.reason_code(), true, false),
            },
            Packet::PubAck(ack) => e.flows.on_puback(now, ack, out),
            Packet::PubRec(rec) => e.flows.on_pubrec(now, stream, rec, out),
            Packet::PubRel(rel) => e.flows.on_pubrel(stream, rel, out),
            Packet::PubComp(comp) => e.flows.on_pubcomp(now, comp, out),
            Packet::SubAck(ack) => {
                e.flows.session.outbound.reserved.remove(&ack.packet_id);
                if self.pending_control.remove(&ack.packet_id) {
                    self.events.push_back(Event::SubAck(ack));
                }
            }
            Packet::UnsubAck(ack) => {
                e.flows.session.outbound.reserved.remove(&ack.packet_id);
                if self.pending_control.remove(&ack.packet_id) {
                    self.events.push_back(Event::UnsubAck(ack));
                }
            }
            Packet::PingResp => {}
            Packet::Disconnect(d) => return self.close(now, d.reason, false, true),
            Packet::Auth(auth) => {
                let method = self.config.authentication.as_ref().map(|(m, _)| m);
                let valid = e.reauthenticating
                    && method.is_some()
                    && auth.properties.authentication_method.as_ref() == method;
                let data = auth.properties.authentication_data;
                match auth.reason {
                    ReasonCode::ContinueAuthentication if valid => {
                        self.events.push_back(Event::AuthChallenge { data });
                    }
                    ReasonCode::Success if valid => {
                        e.reauthenticating = false;
                        self.events.push_back(Event::ReAuthenticated { data });
                    }
                    _ => return self.close(now, ReasonCode::ProtocolError, true, false),
                }
            }
            Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)
            | Packet::PingReq => return self.close(now, ReasonCode::ProtocolError, true, false),
        }
        self.drain_flow_events();
    }

    /// Publishes a message: sent now if the server's receive window allows, else queued
    /// (also before CONNACK, to be sent once connected). A message queued before CONNACK goes
    /// at most at the server's maximum QoS, and without RETAIN if the server has no retained
    /// messages [MQTT-3.2.2-11, MQTT-3.2.2-14].
    pub fn publish(
        &mut self,
        now: Instant,
        message: Arc<Message>,
    ) -> Result<Enqueued, ClientError> {
        self.publish_on(now, StreamId::CONTROL, message)
    }

    /// As [`Self::publish`], on `stream` if it is open (else on the control stream). A message
    /// queued behind the server's receive window keeps its stream; one queued before CONNACK
    /// goes on the control stream.
    pub fn publish_on(
        &mut self,
        now: Instant,
        stream: StreamId,
        message: Arc<Message>,
    ) -> Result<Enqueued, ClientError> {
        let delivery = Delivery::new(message);
        let outcome = match &mut self.state {
            State::Connecting(h) | State::Authenticating(h) => h.session.enqueue(now, delivery),
            State::Connected(e) => {
                if delivery.qos > e.server_maximum_qos {
                    return Err(ClientError::QoSNotSupported(e.server_maximum_qos));
                }
                if delivery.retain && !e.server_retain_available {
                    return Err(ClientError::RetainNotSupported);
                }
                e.flows.deliver(now, stream, delivery, &mut self.transmits)
            }
            State::Closed { .. } => return Err(ClientError::Closed),
        };
        self.drain_flow_events();
        Ok(outcome)
    }

    fn control_id(&mut self) -> Result<PacketId, ClientError> {
        let in_flight = |id: PacketId, s: &State| match s {
            State::Connected(e) => e.flows.session.outbound.get(id).is_some(),
            State::Connecting(h) | State::Authenticating(h) => h.session.outbound.get(id).is_some(),
            State::Closed { .. } => false,
        };
        let mut id = self.next_control_id;
        for _ in 0..=u16::MAX {
            if !self.pending_control.contains(&id) && !in_flight(id, &self.state) {
                self.next_control_id = id.next();
                self.pending_control.insert(id);
                // Publications share the identifier space [MQTT-2.2.1-3].
                if let State::Connected(e) = &mut self.state {
                    e.flows.session.outbound.reserved.insert(id);
                } else if let State::Connecting(h) | State::Authenticating(h) = &mut self.state {
                    h.session.outbound.reserved.insert(id);
                }
                return Ok(id);
            }
            id = id.next();
        }
        Err(ClientError::NoPacketId)
    }

    /// Sends SUBSCRIBE (allowed before CONNACK); the answer arrives as [`Event::SubAck`].
    pub fn subscribe(
        &mut self,
        filters: Vec<Subscription>,
        properties: SubscribeProperties,
    ) -> Result<PacketId, ClientError> {
        self.subscribe_on(StreamId::CONTROL, filters, properties)
    }

    /// As [`Self::subscribe`], on `stream` if it is open (else on the control stream): the
    /// server answers on it and delivers the subscription's messages on it.
    pub fn subscribe_on(
        &mut self,
        stream: StreamId,
        filters: Vec<Subscription>,
        properties: SubscribeProperties,
    ) -> Result<PacketId, ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        if filters.is_empty() {
            return Err(ClientError::NoTopicFilters);
        }
        let packet_id = self.control_id()?;
        let stream = self.live(stream);
        self.transmits.push_back((
            stream,
            Packet::Subscribe(Subscribe {
                packet_id,
                properties,
                filters,
            }),
        ));
        Ok(packet_id)
    }

    /// Sends UNSUBSCRIBE; the answer arrives as [`Event::UnsubAck`].
    pub fn unsubscribe(&mut self, filters: Vec<TopicFilter>) -> Result<PacketId, ClientError> {
        self.unsubscribe_on(StreamId::CONTROL, filters)
    }

    /// As [`Self::unsubscribe`], on `stream` if it is open (else on the control stream).
    pub fn unsubscribe_on(
        &mut self,
        stream: StreamId,
        filters: Vec<TopicFilter>,
    ) -> Result<PacketId, ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        if filters.is_empty() {
            return Err(ClientError::NoTopicFilters);
        }
        let packet_id = self.control_id()?;
        let stream = self.live(stream);
        self.transmits.push_back((
            stream,
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                user_properties: Vec::new(),
                filters,
            }),
        ));
        Ok(packet_id)
    }

    /// Acknowledges an incoming QoS 1 or 2 message (when `auto_ack` is off).
    ///
    /// After the connection closed (and before the session is taken) nothing is sent, but a
    /// QoS 2 message is recorded in the session as received, so that the server's
    /// retransmission on the next connection is answered with PUBREC and not reported a second
    /// time [MQTT-4.3.3-9].
    pub fn ack(&mut self, packet_id: PacketId, reason: ReasonCode) -> Result<(), ClientError> {
        let v5 = self.config.version.is_v5();
        let reason = puback_reason(v5, reason);
        let e = match &mut self.state {
            State::Connected(e) => e,
            State::Closed {
                session: Some(session),
            } => {
                return ack_after_close(&mut self.unacked_at_close, session, packet_id, reason)
                    .then_some(())
                    .ok_or(ClientError::UnknownPacketId(packet_id));
            }
            _ => return Err(ClientError::NotConnected),
        };
        if e.flows.ack_inbound(packet_id, reason, &mut self.transmits) {
            Ok(())
        } else {
            Err(ClientError::UnknownPacketId(packet_id))
        }
    }

    /// Continues an authentication exchange the server challenged.
    pub fn auth_continue(&mut self, data: Option<Bytes>) -> Result<(), ClientError> {
        let reauthenticating = matches!(&self.state, State::Connected(e) if e.reauthenticating);
        if !matches!(self.state, State::Authenticating(_)) && !reauthenticating {
            return Err(ClientError::NotAuthenticating);
        }
        self.send_auth(ReasonCode::ContinueAuthentication, data);
        Ok(())
    }

    /// Starts re-authentication with the method used at CONNECT (MQTT 5).
    pub fn reauthenticate(&mut self, data: Option<Bytes>) -> Result<(), ClientError> {
        let State::Connected(e) = &mut self.state else {
            return Err(ClientError::NotConnected);
        };
        if self.config.authentication.is_none() || !e.flows.version.is_v5() {
            return Err(ClientError::NotAuthenticating);
        }
        e.reauthenticating = true;
        self.send_auth(ReasonCode::ReAuthenticate, data);
        Ok(())
    }

    fn send_auth(&mut self, reason: ReasonCode, data: Option<Bytes>) {
        let method = self.config.authentication.as_ref().map(|(m, _)| m.clone());
        self.transmits.push_back(control(Packet::Auth(Auth {
            reason,
            properties: AuthProperties {
                authentication_method: method,
                authentication_data: data,
                ..AuthProperties::default()
            },
        })));
    }

    /// Disconnects: DISCONNECT with `reason` (0x00 discards the will, 0x04 asks the server to
    /// publish it; a code DISCONNECT may not carry is sent as 0x80 or 0x00) and, for MQTT 5, an
    /// optional new session expiry interval. A non-zero one is ignored when CONNECT asked for
    /// none, which the server would take as a protocol error [MQTT-3.14.2-2].
    pub fn disconnect(&mut self, now: Instant, reason: ReasonCode, session_expiry: Option<u32>) {
        if self.is_closed() {
            return;
        }
        let session_expiry =
            session_expiry.filter(|e| *e == 0 || self.config.session_expiry_interval != 0);
        let mut d = Disconnect::new(reason_for(ReasonContext::Disconnect, reason));
        if self.config.version.is_v5() {
            d.properties.session_expiry_interval = session_expiry;
        }
        if let Some(expiry) = session_expiry {
            if let State::Connected(e) = &mut self.state {
                e.flows.session.set_expiry_interval(expiry);
            }
        }
        self.transmits.push_back(control(Packet::Disconnect(d)));
        self.close(now, reason, false, false);
    }

    /// After [`Event::Closed`]: the session, to resume with a later connection.
    pub fn take_session(&mut self) -> Option<Session> {
        match &mut self.state {
            State::Closed { session } => session.take().map(|s| *s),
            _ => None,
        }
    }

    fn close(&mut self, now: Instant, reason: ReasonCode, send_disconnect: bool, by_server: bool) {
        let previous = std::mem::replace(&mut self.state, State::Closed { session: None });
        let mut session = match previous {
            State::Connected(e) => {
                if send_disconnect && e.flows.version.is_v5() {
                    let reason = if reason.valid_for(ReasonContext::Disconnect) {
                        reason
                    } else {
                        ReasonCode::UnspecifiedError
                    };
                    self.transmits
                        .push_back(control(Packet::Disconnect(Disconnect::new(reason))));
                }
                let mut flows = e.flows;
                self.unacked_at_close = flows.take_unacked();
                let mut session = flows.session;
                session.disconnected(now, None);
                Some(Box::new(session))
            }
            State::Connecting(h) | State::Authenticating(h) => Some(Box::new(h.session)),
            State::Closed { session } => session,
        };
        if let Some(s) = &mut session {
            // SUBSCRIBE and UNSUBSCRIBE do not outlive the connection.
            s.outbound.reserved.clear();
        }
        self.state = State::Closed { session };
        self.pending_control.clear();
        self.events.push_back(Event::Closed { reason, by_server });
    }

    fn drain_flow_events(&mut self) {
        let State::Connected(e) = &mut self.state else {
            return;
        };
        while let Some(event) = e.flows.events.pop_front() {
            if let FlowEvent::Completed {
                packet_id,
                reason,
                delivery,
            } = event
            {
                self.events.push_back(Event::Delivered {
                    packet_id,
                    reason,
                    delivery,
                });
            }
        }
    }
}

/// A packet for the control stream.
fn control(packet: Packet) -> (StreamId, Packet) {
    (StreamId::CONTROL, packet)
}
