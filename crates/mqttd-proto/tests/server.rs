//! The server connection state machine, driven packet by packet on a virtual clock.
//!
//! Every packet a test sends goes through the codec the way a transport driver would feed it
//! (encoded with the client's version, cut and decoded by a [`PacketReader`] limited to the
//! server's maximum packet size), and every packet the server transmits is encoded with
//! [`ServerConnection::version`] and decoded by a reader limited to the client's maximum packet
//! size. [`Conn`] also checks, on every transmit, the rules a client relies on whatever the test:
//! nothing but AUTH before CONNACK, no DISCONNECT to an MQTT 3 client, no more unacknowledged
//! QoS 1 and 2 PUBLISH packets than the client's receive maximum, and topic aliases the client
//! can resolve.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use common::*;
use mqttd_proto::codec::PacketReader;
use mqttd_proto::server::{
    Accept, ConnectRequest, Event, ServerConfig, ServerConnection, StateError,
};
use mqttd_proto::session::{
    Enqueued, OutboundState, QueueLimits, Session, SessionEvent, NEVER_EXPIRES,
};
use mqttd_proto::{
    ConnAck, Disconnect, DisconnectProperties, Message, Packet, PacketId, ProtocolVersion, Publish,
    QoS, ReasonCode as R, TopicName,
};

const V3_1: ProtocolVersion = ProtocolVersion::V3_1;
const V3_1_1: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;
const Q0: QoS = QoS::AtMostOnce;
const Q1: QoS = QoS::AtLeastOnce;
const Q2: QoS = QoS::ExactlyOnce;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// One connection to the server under test, seen from the client's end of the wire.
struct Conn {
    clock: Clock,
    server: ServerConnection,
    /// The version the client encodes with (from its CONNECT).
    version: ProtocolVersion,
    /// The client's limits, from its CONNECT.
    max_packet_size: u32,
    receive_maximum: usize,
    topic_alias_maximum: u16,
    /// Topic aliases the server set on this connection, as the client records them.
    aliases: HashMap<u16, TopicName>,
    /// QoS 1 and 2 PUBLISH packets received on this connection and not yet finished by the
    /// client (PUBACK, PUBCOMP, or PUBREC with an error).
    unacked: BTreeSet<PacketId>,
    connack: Option<ConnAck>,
}

/// What the server produced since the last look.
#[derive(Debug)]
struct Out {
    /// Packets as the client decoded them.
    packets: Vec<Packet>,
    /// Their bytes.
    wire: Vec<Bytes>,
    events: Vec<Event>,
    /// The topic of each PUBLISH in `packets`, aliases resolved as the client resolves them.
    topics: Vec<TopicName>,
}

impl Out {
    fn raw(&self) -> Vec<Vec<u8>> {
        self.wire.iter().map(|b| b.to_vec()).collect()
    }

    fn publishes(&self) -> Vec<&Publish> {
        self.packets
            .iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    fn is_empty(&self) -> bool {
        self.packets.is_empty() && self.events.is_empty()
    }
}

impl Conn {
    /// A transport connected at `now`; nothing sent yet.
    fn new(clock: Clock, config: ServerConfig, now: Instant) -> Self {
        Self {
            clock,
            server: ServerConnection::new(config, now),
            version: V5,
            max_packet_size: u32::MAX,
            receive_maximum: usize::from(u16::MAX),
            topic_alias_maximum: 0,
            aliases: HashMap::new(),
            unacked: BTreeSet::new(),
            connack: None,
        }
    }

    fn at(&self, secs: u64) -> Instant {
        self.clock.at(secs)
    }

    /// Connects at `now` and accepts with `session` (a fresh one if `None`, with
    /// `session_present` false).
    fn open_with(
        clock: Clock,
        config: ServerConfig,
        now: Instant,
        connect: ConnectBuilder,
        session: Option<Session>,
    ) -> (Self, Out) {
        let mut conn = Self::new(clock, config, now);
        let request = conn.connect(now, connect);
        let present = session.is_some();
        let session = session.unwrap_or_else(|| {
            Session::new(
                request.connect.client_id.clone(),
                request.session_expiry_interval,
                QueueLimits::default(),
            )
        });
        let out = conn.accept(now, Accept::new(session, present));
        (conn, out)
    }

    /// Connects at the start of a new clock with a fresh session.
    fn open(config: ServerConfig, connect: ConnectBuilder) -> Self {
        let clock = Clock::new();
        let (conn, out) = Self::open_with(clock, config, clock.t0(), connect, None);
        assert_eq!(out.packets.len(), 1, "{:?}", out.packets);
        assert!(out.events.is_empty(), "{:?}", out.events);
        conn
    }

    /// Sends a packet from the client.
    fn send(&mut self, now: Instant, packet: Packet) {
        match &packet {
            Packet::Connect(c) => {
                self.version = c.protocol;
                let p = &c.properties;
                self.max_packet_size = p.maximum_packet_size.map_or(u32::MAX, NonZeroU32::get);
                self.receive_maximum = p
                    .receive_maximum
                    .map_or(usize::from(u16::MAX), |r| usize::from(r.get()));
                self.topic_alias_maximum = p.topic_alias_maximum.unwrap_or(0);
            }
            Packet::PubAck(r) | Packet::PubComp(r) => {
                self.unacked.remove(&r.packet_id);
            }
            Packet::PubRec(r) if r.reason.is_error() => {
                self.unacked.remove(&r.packet_id);
            }
            _ => {}
        }
        let wire = encode(self.version, &packet);
        self.send_bytes(now, &wire);
    }

    /// Feeds bytes to the server as its driver would: a reader limited to the server's maximum
    /// packet size, and a decoding error reported to the machine.
    fn send_bytes(&mut self, now: Instant, wire: &[u8]) {
        let mut buf = BytesMut::from(wire);
        let mut reader = PacketReader::new(self.server.max_packet_size());
        loop {
            match reader.read(&mut buf, self.server.version()) {
                Ok(Some(packet)) => self.server.handle_packet(now, packet),
                Ok(None) => break,
                Err(e) => {
                    self.server.handle_decode_error(now, &e);
                    break;
                }
            }
        }
    }

    /// Takes what the server produced, checking what every client relies on.
    #[track_caller]
    fn out(&mut self, now: Instant) -> Out {
        let d = drain(&mut self.server, now, self.max_packet_size);
        let mut topics = Vec::new();
        for packet in &d.packets {
            if !matches!(packet, Packet::ConnAck(_) | Packet::Auth(_)) {
                // [MQTT-3.2.0-1]
                assert!(
                    self.connack
                        .as_ref()
                        .is_some_and(|a| a.reason == R::Success),
                    "{packet:?} sent without a successful CONNACK before it"
                );
            }
            match packet {
                Packet::ConnAck(ack) => {
                    assert!(self.connack.is_none(), "a second CONNACK: {ack:?}");
                    if ack.reason != R::Success {
                        // [MQTT-3.2.2-6]
                        assert!(!ack.session_present, "session present with an error");
                    }
                    self.connack = Some(ack.clone());
                }
                Packet::Disconnect(_) => {
                    assert!(self.version.is_v5(), "DISCONNECT sent to an MQTT 3 client");
                }
                Packet::Publish(p) => {
                    topics.push(self.resolve(p));
                    if let Some(id) = p.packet_id {
                        // [MQTT-2.2.1-4]: an identifier is not reused while in flight.
                        assert!(self.unacked.insert(id), "{id} reused while in flight");
                        // [MQTT-3.3.4-9]
                        assert!(
                            self.unacked.len() <= self.receive_maximum,
                            "{} QoS 1 and 2 messages unacknowledged, receive maximum {}",
                            self.unacked.len(),
                            self.receive_maximum
                        );
                    }
                }
                _ => {}
            }
        }
        Out {
            packets: d.packets,
            wire: d.wire,
            events: d.events,
            topics,
        }
    }

    fn resolve(&mut self, p: &Publish) -> TopicName {
        let Some(alias) = p.properties.topic_alias else {
            assert!(!p.topic.is_empty(), "PUBLISH without topic or alias");
            return p.topic.clone();
        };
        assert!(self.version.is_v5(), "topic alias sent to an MQTT 3 client");
        // MQTT 5.0 section 3.3.2.3.4.
        assert!(
            alias.get() <= self.topic_alias_maximum,
            "alias {alias} above the client's maximum {}",
            self.topic_alias_maximum
        );
        if p.topic.is_empty() {
            self.aliases
                .get(&alias.get())
                .cloned()
                .unwrap_or_else(|| panic!("alias {alias} used before the server set it"))
        } else {
            self.aliases.insert(alias.get(), p.topic.clone());
            p.topic.clone()
        }
    }

    /// Sends CONNECT and expects the broker to be asked, with nothing sent yet.
    #[track_caller]
    fn connect(&mut self, now: Instant, connect: ConnectBuilder) -> ConnectRequest {
        self.send(now, connect.packet());
        let out = self.out(now);
        assert!(out.packets.is_empty(), "{:?}", out.packets);
        match &out.events[..] {
            [Event::Connect(request)] => request.clone(),
            other => panic!("expected one Connect event, got {other:?}"),
        }
    }

    /// Accepts the pending CONNECT and expects a successful CONNACK first.
    #[track_caller]
    fn accept(&mut self, now: Instant, accept: Accept) -> Out {
        self.server
            .accept(now, accept)
            .expect("a CONNECT is pending");
        let out = self.out(now);
        match out.packets.first() {
            Some(Packet::ConnAck(ack)) if ack.reason == R::Success => {}
            other => panic!("expected a successful CONNACK first, got {other:?}"),
        }
        out
    }

    fn connack(&self) -> &ConnAck {
        self.connack.as_ref().expect("CONNACK sent")
    }

    /// Delivers messages and expects each outcome.
    #[track_caller]
    fn deliver_all(&mut self, now: Instant, deliveries: Vec<(mqttd_proto::Delivery, Enqueued)>) {
        for (i, (d, expected)) in deliveries.into_iter().enumerate() {
            assert_eq!(self.server.deliver(now, d), expected, "delivery {i}");
        }
    }

    /// The session after the connection closed.
    #[track_caller]
    fn take_session(&mut self) -> Session {
        assert!(self.server.is_closed());
        self.server.take_session().expect("a session after close")
    }
}

fn config() -> ServerConfig {
    ServerConfig::default()
}

/// The single packet of `out`.
#[track_caller]
fn only(out: &Out) -> &Packet {
    assert_eq!(out.packets.len(), 1, "{:?}", out.packets);
    &out.packets[0]
}

#[track_caller]
fn only_event(out: &Out) -> &Event {
    assert_eq!(out.events.len(), 1, "{:?}", out.events);
    &out.events[0]
}

fn closed(reason: R, by_client: bool) -> Event {
    Event::Closed { reason, by_client }
}

/// A message whose expiry falls at `expires_at`.
fn expiring(
    topic_name: &str,
    qos: QoS,
    payload: &str,
    expires_at: Instant,
) -> mqttd_proto::Delivery {
    let mut m = Message::new(topic(topic_name), bytes(payload), qos, false);
    m.expires_at = Some(expires_at);
    mqttd_proto::Delivery::new(Arc::new(m))
}

/// Runs a stored session's timers up to `until`, as the broker would between connections.
fn session_timers(session: &mut Session, until: Instant) -> Vec<(Instant, SessionEvent)> {
    let mut fired = Vec::new();
    while let Some(due) = session.poll_timeout().filter(|due| *due <= until) {
        let event = session
            .handle_timeout(due)
            .unwrap_or_else(|| panic!("a timer due at {due:?} produced nothing"));
        fired.push((due, event));
    }
    fired
}

/// The will the session's timers publish at `now`, whether as a will or with the expiry.
fn will_due(session: &mut Session, now: Instant) -> Option<Message> {
    assert!(session.poll_timeout().is_some_and(|due| due <= now));
    match session.handle_timeout(now)? {
        SessionEvent::WillDue(m) => Some(m),
        SessionEvent::Expired { will } => will,
    }
}

/// A CONNECT with the given protocol name and level, as raw bytes.
fn raw_connect(name: &str, level: u8) -> Vec<u8> {
    let mut body = (name.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(&[level, 0x02, 0, 60, 0, 1, b'c']);
    let mut wire = vec![0x10, body.len() as u8];
    wire.extend(body);
    wire
}

// ---------------------------------------------------------------------------------------------
// CONNECT and CONNACK
// ---------------------------------------------------------------------------------------------

#[test]
fn connect_is_reported_and_nothing_is_sent_before_the_broker_answers() {
    let clock = Clock::new();
    let mut conn = Conn::new(clock, config(), clock.t0());
    let connect = ConnectBuilder::v5("sensor-1")
        .keep_alive(30)
        .session_expiry(120)
        .receive_maximum(5)
        .credentials("alice", "secret")
        .will(will("status/sensor-1", "offline", Q1));
    let expected = connect.clone().build();

    let request = conn.connect(clock.at(1), connect);
    assert_eq!(*request.connect, expected);
    assert_eq!(request.session_expiry_interval, 120);
    assert_eq!(request.keep_alive, 30);
    assert_eq!(conn.server.version(), Some(V5));
    assert_eq!(conn.server.client_id(), Some(&client_id("sensor-1")));
    assert!(!conn.server.is_connected() && !conn.server.is_closed());
    assert!(conn.server.session().is_none());

    // Nothing that needs an established connection works yet.
    let now = clock.at(2);
    assert_eq!(
        conn.server.publish_ack(pid(1), R::Success),
        Err(StateError::NotConnected)
    );
    assert_eq!(
        conn.server.subscribe_ack(pid(1), vec![R::Success]),
        Err(StateError::NotConnected)
    );
    assert_eq!(
        conn.server.deliver(now, delivery("a", Q1, "x")),
        Enqueued::NotConnected
    );
    assert_eq!(
        conn.server.reauth_success(None),
        Err(StateError::NotConnected)
    );
    assert!(conn.out(now).is_empty());
}

#[test]
fn connack_announces_server_limits_and_what_the_server_changed() {
    let config = ServerConfig {
        receive_maximum: 10,
        max_packet_size: 4096,
        topic_alias_maximum: 5,
        max_keepalive: 20,
        max_session_expiry: 60,
        ..config()
    };
    let clock = Clock::new();
    let mut conn = Conn::new(clock, config, clock.t0());
    let request = conn.connect(
        clock.t0(),
        ConnectBuilder::v5("").keep_alive(100).session_expiry(3600),
    );
    assert_eq!(request.keep_alive, 20);
    assert_eq!(request.session_expiry_interval, 60);

    let mut accept = Accept::new(
        Session::new(client_id("auto-1"), 60, QueueLimits::default()),
        false,
    );
    accept.assigned_client_id = Some(client_id("auto-1"));
    let out = conn.accept(clock.at(1), accept);
    let Packet::ConnAck(ack) = only(&out) else {
        unreachable!()
    };
    assert!(!ack.session_present);
    let p = &ack.properties;
    assert_eq!(p.receive_maximum, NonZeroU16::new(10));
    assert_eq!(p.maximum_packet_size, NonZeroU32::new(4096));
    assert_eq!(p.topic_alias_maximum, Some(5));
    assert_eq!(p.server_keep_alive, Some(20), "[MQTT-3.2.2-21]");
    assert_eq!(p.session_expiry_interval, Some(60));
    assert_eq!(p.assigned_client_identifier, Some(client_id("auto-1")));
    // Full capabilities are left implicit.
    assert_eq!(p.maximum_qos, None);
    assert_eq!(p.retain_available, None);
    assert_eq!(p.wildcard_subscription_available, None);
    assert_eq!(p.subscription_identifiers_available, None);
    assert_eq!(p.shared_subscription_available, None);
    assert_eq!(p.authentication_method, None);

    assert!(conn.server.is_connected());
    assert_eq!(conn.server.client_id(), Some(&client_id("auto-1")));
    assert_eq!(
        conn.server.session().map(Session::expiry_interval),
        Some(60)
    );
    // The keep alive enforced is the one the server announced: 1.5 x 20 s.
    assert_eq!(conn.server.poll_timeout(), Some(clock.at(31)));
}

#[test]
fn connack_leaves_out_values_the_client_asked_for_unchanged() {
    let conn = Conn::open(
        config(),
        ConnectBuilder::v5("c").keep_alive(30).session_expiry(60),
    );
    let p = &conn.connack().properties;
    assert_eq!(p.server_keep_alive, None);
    assert_eq!(p.session_expiry_interval, None);
    assert_eq!(p.assigned_client_identifier, None);
    assert_eq!(p.receive_maximum, NonZeroU16::new(1024));
    assert_eq!(p.maximum_packet_size, NonZeroU32::new(1024 * 1024));
    assert_eq!(p.topic_alias_maximum, Some(64));
}

#[test]
fn connack_announces_missing_capabilities_and_the_server_enforces_them() {
    let config = ServerConfig {
        maximum_qos: Q1,
        retain_available: false,
        wildcard_subscription_available: false,
        subscription_identifiers_available: false,
        shared_subscription_available: false,
        topic_alias_maximum: 0,
        receive_maximum: u16::MAX,
        ..config()
    };
    let mut conn = Conn::open(config.clone(), ConnectBuilder::v5("c"));
    let p = &conn.connack().properties;
    assert_eq!(p.maximum_qos, Some(Q1));
    assert_eq!(p.retain_available, Some(false));
    assert_eq!(p.wildcard_subscription_available, Some(false));
    assert_eq!(p.subscription_identifiers_available, Some(false));
    assert_eq!(p.shared_subscription_available, Some(false));
    assert_eq!(p.topic_alias_maximum, None);
    assert_eq!(p.receive_maximum, None, "65535 is the default");

    // QoS 2 above the announced maximum: the client broke [MQTT-3.2.2-11] (section 3.2.2.3.4).
    let now = conn.at(1);
    conn.send(now, Packet::Publish(publish("a", Q2, 1, "x")));
    let out = conn.out(now);
    assert_eq!(out.raw(), vec![vec![0xE0, 1, 0x9B]]);
    assert_eq!(out.events, vec![closed(R::QoSNotSupported, false)]);

    // RETAIN though retain is not available (section 3.2.2.3.5).
    let mut conn = Conn::open(config, ConnectBuilder::v5("c"));
    let mut retained = publish("a", Q0, 0, "x");
    retained.retain = true;
    conn.send(now, Packet::Publish(retained));
    let out = conn.out(now);
    assert_eq!(out.raw(), vec![vec![0xE0, 1, 0x9A]]);
    assert_eq!(out.events, vec![closed(R::RetainNotSupported, false)]);
}

#[test]
fn mqtt3_connack_is_two_bytes_with_session_present() {
    for (version, flags) in [(V3_1_1, 0x01), (V3_1, 0x00)] {
        let clock = Clock::new();
        let stored = Session::new(client_id("c"), NEVER_EXPIRES, QueueLimits::default());
        let (conn, out) = Conn::open_with(
            clock,
            config(),
            clock.t0(),
            ConnectBuilder::new(version, "c").clean_start(false),
            Some(stored),
        );
        // 3.1 has no session present flag.
        assert_eq!(out.raw(), vec![vec![0x20, 2, flags, 0x00]], "{version}");
        assert!(conn.server.is_connected());
    }
}

#[test]
fn rejected_v5_connect_gets_a_connack_reason_and_never_a_disconnect() {
    for (reason, code) in [
        (R::BadUserNameOrPassword, 0x86),
        (R::NotAuthorized, 0x87),
        (R::ServerBusy, 0x89),
        (R::Banned, 0x8A),
        (R::ClientIdentifierNotValid, 0x85),
        (R::BadAuthenticationMethod, 0x8C),
        (R::UseAnotherServer, 0x9C),
        // Not a CONNACK code, or not an error: the broker's mistake must not reach the wire.
        (R::SessionTakenOver, 0x80),
        (R::Success, 0x80),
    ] {
        let clock = Clock::new();
        let mut conn = Conn::new(clock, config(), clock.t0());
        conn.connect(clock.t0(), ConnectBuilder::v5("c").will(will("w", "x", Q0)));
        // Pipelined behind CONNECT, and never processed.
        conn.send(clock.t0(), Packet::PingReq);
        conn.send(clock.t0(), Packet::Publish(publish("a", Q1, 1, "x")));

        let now = clock.at(1);
        conn.server.reject(now, reason).unwrap();
        let out = conn.out(now);
        assert_eq!(out.raw(), vec![vec![0x20, 3, 0x00, code, 0x00]], "{reason}");
        assert_eq!(out.events, vec![closed(reason, false)]);
        assert!(conn.server.is_closed());
        assert!(conn.server.take_session().is_none(), "no session, no will");
        assert_eq!(
            conn.server.reject(now, reason),
            Err(StateError::NotConnecting)
        );
        let session = Session::new(client_id("c"), 0, QueueLimits::default());
        assert_eq!(
            conn.server.accept(now, Accept::new(session, false)),
            Err(StateError::NotConnecting)
        );
        conn.send(now, Packet::PingReq);
        assert!(conn.out(now).is_empty());
    }
}

#[test]
fn rejected_mqtt3_connect_gets_return_codes_1_to_5() {
    for version in [V3_1, V3_1_1] {
        for (reason, code) in [
            (R::UnsupportedProtocolVersion, 0x01),
            (R::ClientIdentifierNotValid, 0x02),
            (R::ServerUnavailable, 0x03),
            (R::ServerBusy, 0x03),
            (R::BadUserNameOrPassword, 0x04),
            (R::NotAuthorized, 0x05),
            (R::Banned, 0x05),
        ] {
            let clock = Clock::new();
            let mut conn = Conn::new(clock, config(), clock.t0());
            conn.connect(clock.t0(), ConnectBuilder::new(version, "c"));
            conn.server.reject(clock.t0(), reason).unwrap();
            let out = conn.out(clock.t0());
            assert_eq!(
                out.raw(),
                vec![vec![0x20, 2, 0, code]],
                "{version} {reason}"
            );
            assert_eq!(out.events, vec![closed(reason, false)]);
        }
    }
}

#[test]
fn empty_client_id_needs_clean_session_in_mqtt311_and_is_refused_in_mqtt31() {
    for connect in [
        ConnectBuilder::v311("").clean_start(false),
        ConnectBuilder::new(V3_1, ""),
        ConnectBuilder::new(V3_1, "").clean_start(false),
    ] {
        let clock = Clock::new();
        let mut conn = Conn::new(clock, config(), clock.t0());
        conn.send(clock.t0(), connect.packet());
        let out = conn.out(clock.t0());
        // [MQTT-3.1.3-8]: return code 0x02, identifier rejected.
        assert_eq!(out.raw(), vec![vec![0x20, 2, 0, 0x02]]);
        assert_eq!(out.events, vec![closed(R::ClientIdentifierNotValid, false)]);
    }

    // With clean session, or in MQTT 5 either way, the broker is asked to assign one.
    for connect in [
        ConnectBuilder::v311(""),
        ConnectBuilder::v5(""),
        ConnectBuilder::v5("").clean_start(false),
    ] {
        let clock = Clock::new();
        let mut conn = Conn::new(clock, config(), clock.t0());
        let request = conn.connect(clock.t0(), connect);
        assert!(request.connect.client_id.is_empty());
    }
}

#[test]
fn unsupported_protocol_level_is_answered_in_a_format_the_client_can_read() {
    for (name, level, version, answer) in [
        // Higher, older or unknown: the 3.1.1 return code 0x01 [MQTT-3.1.2-2].
        ("MQTT", 6, V3_1_1, vec![0x20, 2, 0, 0x01]),
        ("MQTT", 0xFF, V3_1_1, vec![0x20, 2, 0, 0x01]),
        ("MQTT", 3, V3_1_1, vec![0x20, 2, 0, 0x01]),
        ("MQIsdp", 4, V3_1_1, vec![0x20, 2, 0, 0x01]),
        ("MQTX", 4, V3_1_1, vec![0x20, 2, 0, 0x01]),
    ] {
        let clock = Clock::new();
        let mut conn = Conn::new(clock, config(), clock.t0());
        conn.send_bytes(clock.t0(), &raw_connect(name, level));
        assert_eq!(conn.server.version(), Some(version));
        // The client reads the CONNACK with the format of the version it spoke.
        conn.version = version;
        let out = conn.out(clock.t0());
        assert_eq!(out.raw(), vec![answer], "{name} {level}");
        assert_eq!(
            out.events,
            vec![closed(R::UnsupportedProtocolVersion, false)]
        );
        assert!(conn.server.is_closed());
    }
}

#[test]
fn malformed_v5_connect_is_answered_with_a_connack() {
    let clock = Clock::new();
    let mut conn = Conn::new(clock, config(), clock.t0());
    // Reserved CONNECT flag set [MQTT-3.1.2-3].
    let mut wire = raw_connect("MQTT", 5);
    wire[9] |= 0x01;
    conn.send_bytes(clock.t0(), &wire);
    let out = conn.out(clock.t0());
    assert_eq!(out.raw(), vec![vec![0x20, 3, 0, 0x81, 0]]);
    assert_eq!(out.events, vec![closed(R::MalformedPacket, false)]);
}

#[test]
fn first_packet_other_than_connect_closes_without_an_answer() {
    // As a driver sees it: the reader refuses anything but CONNECT first [MQTT-3.1.0-1].
    let clock = Clock::new();
    let mut conn = Conn::new(clock, config(), clock.t0());
    conn.send_bytes(clock.t0(), &[0xC0, 0x00]);
    let out = conn.out(clock.t0());
    assert!(out.packets.is_empty());
    assert_eq!(out.events, vec![closed(R::ProtocolError, false)]);
    assert!(conn.server.is_closed());

    // And if a packet reaches the machine anyway.
    let mut conn = Conn::new(clock, config(), clock.t0());
    conn.server
        .handle_packet(clock.t0(), Packet::Publish(publish("a", Q0, 0, "x")));
    let out = conn.out(clock.t0());
    assert!(out.packets.is_empty());
    assert_eq!(out.events, vec![closed(R::ProtocolError, false)]);
}

#[test]
fn second_connect_is_a_protocol_error() {
    // Once connected: DISCONNECT 0x82, and the will is published [MQTT-3.1.0-2].
    let mut conn = Conn::open(
        config(),
        ConnectBuilder::v5("c").will(will("w", "gone", Q0)),
    );
    let now = conn.at(1);
    conn.send(now, ConnectBuilder::v5("c").packet());
    let out = conn.out(now);
    assert_eq!(out.raw(), vec![vec![0xE0, 1, 0x82]]);
    assert_eq!(out.events, vec![closed(R::ProtocolError, false)]);
    assert!(conn.take_session().has_pending_will());

    // MQTT 3.1.1: the connection just closes.
    let mut conn = Conn::open(config(), ConnectBuilder::v311("c"));
    conn.send(now, ConnectBuilder::v311("c").packet());
    let out = conn.out(now);
    assert!(out.packets.is_empty());
    assert_eq!(out.events, vec![closed(R::ProtocolError, false)]);

    // Before the broker answered the first one: closed, nothing sent.
    let clock = Clock::new();
    let mut conn = Conn::new(clock, config(), clock.t0());
    conn.connect(clock.t0(), ConnectBuilder::v5("c"));
    conn.send(clock.t0(), ConnectBuilder::v5("c").packet());
    let out = conn.out(clock.t0());
    assert!(out.packets.is_empty());
    assert_eq!(out.events, vec![closed(R::ProtocolError, false)]);
    let session = Session::new(client_id("c"), 0, QueueLimits::default());
    assert_eq!(
        conn.server.accept(clock.t0(), Accept::new(session, false)),
        Err(StateError::NotConnecting)
    );
}

#[test]
fn connect_timeout_closes_a_connection_that_never_finishes_connecting() {
    let config = ServerConfig {
        connect_timeout: Duration::from_secs(5),
        ..config()
    };

    // No CONNECT at all.
    let clock = Clock::new();
    let mut conn = Conn::new(clock, config.clone(), clock.t0());
    assert_eq!(conn.server.poll_timeout(), Some(clock.at(5)));
    assert!(advance(&mut conn.server, clock.at_ms(4999)).is_empty());
    assert!(!conn.server.is_closed());
    assert_eq!(advance(&mut conn.server, clock.at(60)), vec![clock.at(5)]);
    let out = conn.out(clock.at(5));
    assert!(out.packets.is_empty());
    assert!(matches!(
        only_event(&out),
        Event::Closed {
            by_client: false,
            ..
        }
    ));
    assert_eq!(conn.server.poll_timeout(), None);

    // CONNECT arrives, the broker never answers: the deadline counts from the transport.
    let mut conn = Conn::new(clock, config.clone(), clock.t0());
    conn.connect(clock.at(2), ConnectBuilder::v5("c"));
    assert_eq!(conn.server.poll_timeout(), Some(clock.at(5)));
    conn.server.handle_timeout(clock.at(5));
    let out = conn.out(clock.at(5));
    assert!(out.packets.is_empty(), "{:?}", out.packets);
    assert!(conn.server.is_closed());
    let session = Session::new(client_id("c"), 0, QueueLimits::default());
    assert_eq!(
        conn.server.accept(clock.at(6), Accept::new(session, false)),
        Err(StateError::NotConnecting)
    );

    // Authentication that drags on is cut by the same deadline.
    let mut conn = Conn::new(clock, config, clock.t0());
    conn.connect(clock.at(1), ConnectBuilder::v5("c").auth("SCRAM", None));
    conn.server.auth_continue(None).unwrap();
    conn.out(clock.at(1));
    conn.send(
        clock.at(2),
        auth(R::ContinueAuthentication, Some("SCRAM"), None),
    );
    conn.out(clock.at(2));
    conn.server.auth_continue(None).unwrap();
    conn.out(clock.at(2));
    assert_eq!(advance(&mut conn.server, clock.at(10)), vec![clock.at(5)]);
    assert!(conn.server.is_closed());
    assert!(conn.out(clock.at(5)).packets.is_empty());
}

#[test]
fn packets_pipelined_behind_connect_wait_for_accept() {
    let clock = Clock::new();
    let mut conn = Conn::new(clock, config(), clock.t0());
    conn.connect(clock.t0(), ConnectBuilder::v5("c"));
    conn.send(clock.t0(), Packet::Subscribe(subscribe(1, &[("a/#", Q1)])));
    conn.send(clock.t0(), Packet::Publish(publish("a/b", Q1, 2, "one")));
    conn.send(clock.t0(), Packet::PingReq);
    conn.send(clock.t0(), Packet::Publish(publish("a/c", Q0, 0, "two")));
    // Nothing is processed before the broker accepted the client.
    assert!(conn.out(clock.at(1)).is_empty());

    let session = Session::new(client_id("c"), 0, QueueLimits::default());
    let out = conn.accept(clock.at(2), Accept::new(session, false));
    assert!(matches!(
        &out.packets[..],
        [Packet::ConnAck(_), Packet::PingResp]
    ));
    let [Event::Subscribe(sub), Event::Publish(first), Event::Publish(second)] = &out.events[..]
    else {
        panic!("{:?}", out.events)
    };
    assert_eq!(sub.packet_id, pid(1));
    assert_eq!(first.packet_id, Some(pid(2)));
    assert_eq!(first.message.payload, "one");
    assert_eq!(second.message.topic, topic("a/c"));
    // Persist, then acknowledge: no PUBACK yet for the pipelined QoS 1 message.
    conn.server.publish_ack(pid(2), R::Success).unwrap();
    assert_eq!(conn.out(clock.at(2)).raw(), vec![vec![0x40, 2, 0, 2]]);

    // A DISCONNECT pipelined behind CONNECT ends the connection after accept, without will.
    let mut conn = Conn::new(clock, config(), clock.t0());
    conn.connect(clock.t0(), ConnectBuilder::v5("c").will(will("w", "x", Q0)));
    conn.send(clock.t0(), Packet::Publish(publish("a", Q0, 0, "x")));
    conn.send(clock.t0(), disconnect(R::Success));
    conn.send(clock.t0(), Packet::PingReq);
    let session = Session::new(client_id("c"), 0, QueueLimits::default());
    let out = conn.accept(clock.at(1), Accept::new(session, false));
    assert_eq!(out.packets.len(), 1, "only CONNACK: {:?}", out.packets);
    assert!(matches!(
        &out.events[..],
        [
            Event::Publish(_),
            Event::Closed {
                reason: R::Success,
                by_client: true
            }
        ]
    ));
    assert!(!conn.take_session().has_pending_will());
}

#[test]
fn too_many_packets_pipelined_behind_connect_close_the_connection() {
    let clock = Clock::new();
    let mut conn = Conn::new(clock, config(), clock.t0());
    conn.connect(clock.t0(), ConnectBuilder::v5("c"));
    for _ in 0..64 {
        conn.send(clock.t0(), Packet::PingReq);
    }
    assert!(!conn.server.is_closed());
    conn.send(clock.t0(), Packet::PingReq);
    assert!(conn.server.is_closed());
    let out = conn.out(clock.t0());
    assert!(out.packets.is_empty());
    assert!(matches!(only_event(&out), Event::Closed { .. }));
}

#[test]
fn packets_above_the_server_maximum_packet_size_or_malformed_end_the_connection() {
    let config = ServerConfig {
        max_packet_size: 100,
        ..config()
    };
    let mut conn = Conn::open(
        config.clone(),
        ConnectBuilder::v5("c").will(will("w", "x", Q0)),
    );
    let now = conn.at(1);
    conn.send(now, Packet::Publish(publish("a", Q0, 0, &"x".repeat(100))));
    let out = conn.out(now);
    // The client broke [MQTT-3.2.2-15]: 0x95 Packet too large.
    assert_eq!(out.raw(), vec![vec![0xE0, 1, 0x95]]);
    assert_eq!(out.events, vec![closed(R::PacketTooLarge, false)]);
    assert!(conn.take_session().has_pending_will());

    // A PUBLISH with QoS 3 is malformed: 0x81.
    let mut conn = Conn::open(config, ConnectBuilder::v5("c"));
    conn.send_bytes(now, &[0x36, 4, 0, 1, b'a', 0]);
    let out = conn.out(now);
    assert_eq!(out.raw(), vec![vec![0xE0, 1, 0x81]]);
}

#[test]
fn pingreq_gets_pingresp() {
    let mut conn = Conn::open(config(), ConnectBuilder::v311("c").keep_alive(10));
    let now = conn.at(5);
    conn.send(now, Packet::PingReq);
    let out = conn.out(now);
    assert_eq!(out.raw(), vec![vec![0xD0, 0]]);
    assert!(out.events.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Keep alive
// ---------------------------------------------------------------------------------------------

#[test]
fn keep_alive_closes_at_one_and_a_half_times_with_0x8d_and_publishes_the_will() {
    let mut conn = Conn::open(
        config(),
        ConnectBuilder::v5("c")
            .keep_alive(10)
            .session_expiry(60)
            .will(will("status/c", "lost", Q1)),
    );
    let clock = conn.clock;
    assert_eq!(conn.server.poll_timeout(), Some(clock.at(15)));

    // [MQTT-3.1.2-22]: within 1.5 x the keep alive the client is fine.
    conn.server.handle_timeout(clock.at_ms(14_900));
    assert!(conn.server.is_connected());
    assert!(conn.out(clock.at_ms(14_900)).is_empty());

    assert_eq!(advance(&mut conn.server, clock.at(100)), vec![clock.at(15)]);
    let out = conn.out(clock.at(15));
    assert_eq!(out.raw(), vec![vec![0xE0, 1, 0x8D]]);
    assert_eq!(out.events, vec![closed(R::KeepAliveTimeout, false)]);

    let mut session = conn.take_session();
    let will = will_due(&mut session, clock.at(15)).expect("will published");
    assert_eq!(will.topic, topic("status/c"));
    assert_eq!(will.payload, "lost");
    assert_eq!(will.qos, Q1);
}

#[test]
fn keep_alive_timeout_closes_mqtt3_clients_without_disconnect() {
    let mut conn = Conn::open(
        config(),
        ConnectBuilder::v311("c")
            .keep_alive(4)
            .will(will("w", "x", Q0)),
    );
    let clock = conn.clock;
    assert_eq!(advance(&mut conn.server, clock.at(10)), vec![clock.at(6)]);
    let out = conn.out(clock.at(6));
    assert!(out.packets.is_empty());
    assert_eq!(out.events, vec![closed(R::KeepAliveTimeout, false)]);
    assert!(conn.take_session().has_pending_will());
}

#[test]
fn any_packet_from_the_client_resets_the_keep_alive() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c").keep_alive(10));
    let clock = conn.clock;
    let packets = [
        (9, Packet::PingReq),
        (23, Packet::Publish(publish("a", Q0, 0, "x"))),
        (37, Packet::Subscribe(subscribe(1, &[("a", Q0)]))),
        (51, puback(9)),
        (65, Packet::Unsubscribe(unsubscribe(2, &["a"]))),
    ];
    for (secs, packet) in packets {
        conn.server.handle_timeout(clock.at(secs));
        assert!(conn.server.is_connected(), "closed before {secs} s");
        conn.send(clock.at(secs), packet);
        assert_eq!(conn.server.poll_timeout(), Some(clock.at(secs + 15)));
        conn.out(clock.at(secs));
    }
    conn.server.handle_timeout(clock.at_ms(79_999));
    assert!(conn.server.is_connected());
    conn.server.handle_timeout(clock.at(80));
    assert!(conn.server.is_closed());
}

#[test]
fn keep_alive_zero_disables_the_timer() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c").keep_alive(0));
    assert_eq!(conn.server.poll_timeout(), None);
    let later = conn.at(365 * 24 * 3600);
    conn.server.handle_timeout(later);
    assert!(conn.server.is_connected());
    assert!(conn.out(later).is_empty());
}

#[test]
fn max_keepalive_is_imposed_on_v5_clients_and_refused_for_mqtt3() {
    let config = ServerConfig {
        max_keepalive: 30,
        ..config()
    };
    // Keep alive 0 asks for no timer; the server imposes its maximum.
    let mut conn = Conn::open(config.clone(), ConnectBuilder::v5("c").keep_alive(0));
    assert_eq!(conn.connack().properties.server_keep_alive, Some(30));
    assert_eq!(conn.server.poll_timeout(), Some(conn.at(45)));
    conn.server.handle_timeout(conn.at(45));
    assert_eq!(conn.out(conn.at(45)).raw(), vec![vec![0xE0, 1, 0x8D]]);

    // Below the maximum: unchanged, and not announced.
    let conn = Conn::open(config.clone(), ConnectBuilder::v5("c").keep_alive(20));
    assert_eq!(conn.connack().properties.server_keep_alive, None);
    assert_eq!(conn.server.poll_timeout(), Some(conn.at(30)));

    // MQTT 3 has no way to say so: refused as Mosquitto does.
    let clock = Clock::new();
    let mut conn = Conn::new(clock, config, clock.t0());
    conn.send(
        clock.t0(),
        ConnectBuilder::v311("c").keep_alive(60).packet(),
    );
    assert_eq!(conn.out(clock.t0()).raw(), vec![vec![0x20, 2, 0, 0x02]]);
}

// ---------------------------------------------------------------------------------------------
// QoS 1 and 2 from the client
// ---------------------------------------------------------------------------------------------

#[test]
fn qos1_from_the_client_is_acknowledged_only_after_publish_ack() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c"));
    let now = conn.at(1);
    let mut p = publish("a/b", Q1, 7, "payload");
    p.properties.message_expiry_interval = Some(30);
    p.properties.content_type = Some(s("text/plain"));
    conn.send(now, Packet::Publish(p.clone()));
    let out = conn.out(now);
    assert!(
        out.packets.is_empty(),
        "no PUBACK before the broker stored it"
    );
    let Event::Publish(inbound) = only_event(&out) else {
        panic!("{:?}", out.events)
    };
    assert_eq!(inbound.packet_id, Some(pid(7)));
    assert!(!inbound.dup);
    assert_eq!(inbound.message.topic, topic("a/b"));
    assert_eq!(inbound.message.payload, "payload");
    assert_eq!(inbound.message.qos, Q1);
    assert_eq!(
        inbound.message.expires_at,
        Some(now + Duration::from_secs(30))
    );
    assert_eq!(
        inbound.message.properties.content_type,
        Some(s("text/plain"))
    );

    // The client resends before the answer: no second message, no answer yet.
    p.dup = true;
    conn.send(conn.at(2), Packet::Publish(p));
    assert!(conn.out(conn.at(2)).is_empty());

    conn.server.publish_ack(pid(7), R::Success).unwrap();
    assert_eq!(conn.out(conn.at(3)).raw(), vec![vec![0x40, 2, 0, 7]]);
    assert_eq!(
        conn.server.publish_ack(pid(7), R::Success),
        Err(StateError::UnknownPacketId(pid(7)))
    );

    // QoS 0 is never acknowledged.
    conn.send(conn.at(4), Packet::Publish(publish("a", Q0, 0, "x")));
    let out = conn.out(conn.at(4));
    assert!(out.packets.is_empty());
    assert!(matches!(only_event(&out), Event::Publish(p) if p.packet_id.is_none()));
}

#[test]
fn publish_ack_carries_the_broker_reason_in_v5_only() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c"));
    let now = conn.at(1);
    conn.send(now, Packet::Publish(publish("a", Q1, 1, "x")));
    conn.send(now, Packet::Publish(publish("a", Q1, 2, "x")));
    conn.out(now);
    conn.server.publish_ack(pid(1), R::NotAuthorized).unwrap();
    conn.server
        .publish_ack(pid(2), R::NoMatchingSubscribers)
        .unwrap();
    assert_eq!(
        conn.out(now).raw(),
        vec![vec![0x40, 3, 0, 1, 0x87], vec![0x40, 3, 0, 2, 0x10]]
    );

    let mut conn = Conn::open(config(), ConnectBuilder::v311("c"));
    conn.send(now, Packet::Publish(publish("a", Q1, 1, "x")));
    conn.out(now);
    conn.server.publish_ack(pid(1), R::NotAuthorized).unwrap();
    assert_eq!(conn.out(now).raw(), vec![vec![0x40, 2, 0, 1]]);
}

#[test]
fn qos2_from_the_client_is_delivered_once() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c"));
    let clock = conn.clock;
    conn.send(clock.at(1), Packet::Publish(publish("a", Q2, 1, "once")));
    let out = conn.out(clock.at(1));
    assert!(
        out.packets.is_empty(),
        "no PUBREC before the broker stored it"
    );
    assert!(matches!(only_event(&out), Event::Publish(p) if p.packet_id == Some(pid(1))));

    conn.server.publish_ack(pid(1), R::Success).unwrap();
    assert_eq!(conn.out(clock.at(2)).raw(), vec![vec![0x50, 2, 0, 1]]);

    // The PUBREC was lost: the client resends; PUBREC again, no second message.
    let mut again = publish("a", Q2, 1, "once");
    again.dup = true;
    conn.send(clock.at(3), Packet::Publish(again));
    let out = conn.out(clock.at(3));
    assert_eq!(out.raw(), vec![vec![0x50, 2, 0, 1]]);
    assert!(out.events.is_empty(), "{:?}", out.events);

    conn.send(clock.at(4), pubrel(1));
    let out = conn.out(clock.at(4));
    assert_eq!(out.raw(), vec![vec![0x70, 2, 0, 1]]);
    assert_eq!(
        out.events,
        vec![Event::InboundReleased { packet_id: pid(1) }]
    );

    // The identifier is free again: a new message.
    conn.send(clock.at(5), Packet::Publish(publish("a", Q2, 1, "twice")));
    let out = conn.out(clock.at(5));
    assert!(matches!(only_event(&out), Event::Publish(p) if p.message.payload == "twice"));
}

#[test]
fn qos2_refused_by_the_broker_ends_with_an_error_pubrec() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c"));
    let now = conn.at(1);
    conn.send(now, Packet::Publish(publish("a", Q2, 3, "x")));
    conn.out(now);
    conn.server.publish_ack(pid(3), R::QuotaExceeded).unwrap();
    assert_eq!(conn.out(now).raw(), vec![vec![0x50, 3, 0, 3, 0x97]]);
    // The flow is over: the same identifier carries a new message.
    conn.send(now, Packet::Publish(publish("a", Q2, 3, "y")));
    assert!(matches!(only_event(&conn.out(now)), Event::Publish(_)));
}

#[test]
fn pubrel_for_an_unknown_identifier_gets_pubcomp() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c"));
    let now = conn.at(1);
    conn.send(now, pubrel(42));
    let out = conn.out(now);
    // Answered, with 0x92 Packet identifier not found (section 3.7.2.1).
    assert_eq!(out.raw(), vec![vec![0x70, 3, 0, 42, 0x92]]);
    assert!(out.events.is_empty());
    assert!(conn.server.is_connected());

    let mut conn = Conn::open(config(), ConnectBuilder::v311("c"));
    conn.send(now, pubrel(42));
    assert_eq!(conn.out(now).raw(), vec![vec![0x70, 2, 0, 42]]);
}

#[test]
fn receive_maximum_counts_unacknowledged_qos1_and_unreleased_qos2() {
    let config = ServerConfig {
        receive_maximum: 2,
        ..config()
    };
    let mut conn = Conn::open(config, ConnectBuilder::v5("c"));
    assert_eq!(
        conn.connack().properties.receive_maximum,
        NonZeroU16::new(2)
    );
    let now = conn.at(1);
    conn.send(now, Packet::Publish(publish("a", Q1, 1, "x")));
    conn.send(now, Packet::Publish(publish("a", Q2, 2, "x")));
    conn.send(now, Packet::Publish(publish("a", Q0, 0, "x")));
    assert_eq!(conn.out(now).events.len(), 3);

    conn.server.publish_ack(pid(1), R::Success).unwrap();
    conn.server.publish_ack(pid(2), R::Success).unwrap();
    conn.out(now);
    // One slot is held by message 2 until PUBREL.
    conn.send(now, Packet::Publish(publish("a", Q1, 3, "x")));
    assert!(conn.server.is_connected());
    conn.out(now);
    conn.send(now, Packet::Publish(publish("a", Q1, 4, "x")));
    let out = conn.out(now);
    // The client broke [MQTT-3.3.4-7]: 0x93 Receive Maximum exceeded.
    assert_eq!(out.raw(), vec![vec![0xE0, 1, 0x93]]);
    assert_eq!(out.events, vec![closed(R::ReceiveMaximumExceeded, false)]);
}

#[test]
fn qos2_awaiting_release_survives_a_reconnect() {
    let clock = Clock::new();
    let connect = || {
        ConnectBuilder::v5("c")
            .clean_start(false)
            .session_expiry(300)
    };
    let (mut conn, _) = Conn::open_with(clock, config(), clock.t0(), connect(), None);
    conn.send(clock.at(1), Packet::Publish(publish("a", Q2, 9, "x")));
    conn.out(clock.at(1));
    conn.server.publish_ack(pid(9), R::Success).unwrap();
    conn.out(clock.at(1));
    conn.server.connection_lost(clock.at(2));
    let session = conn.take_session();
    assert_eq!(session.pending_releases().collect::<Vec<_>>(), vec![pid(9)]);

    let (mut conn, _) = Conn::open_with(clock, config(), clock.at(3), connect(), Some(session));
    let mut again = publish("a", Q2, 9, "x");
    again.dup = true;
    conn.send(clock.at(3), Packet::Publish(again));
    let out = conn.out(clock.at(3));
    assert_eq!(out.raw(), vec![vec![0x50, 2, 0, 9]]);
    assert!(out.events.is_empty(), "delivered twice: {:?}", out.events);
    conn.send(clock.at(3), pubrel(9));
    let out = conn.out(clock.at(3));
    assert_eq!(out.raw(), vec![vec![0x70, 2, 0, 9]]);
    assert_eq!(
        out.events,
        vec![Event::InboundReleased { packet_id: pid(9) }]
    );
}

#[test]
fn subscription_identifier_in_a_client_publish_is_a_protocol_error() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c"));
    let now = conn.at(1);
    let mut p = publish("a", Q0, 0, "x");
    p.properties.subscription_identifiers = vec![NonZeroU32::new(3).unwrap()];
    conn.send(now, Packet::Publish(p));
    let out = conn.out(now);
    // [MQTT-3.3.4-6]
    assert_eq!(out.raw(), vec![vec![0xE0, 1, 0x82]]);
    assert_eq!(out.events, vec![closed(R::ProtocolError, false)]);
}

// ---------------------------------------------------------------------------------------------
// QoS 1 and 2 to the client
// ---------------------------------------------------------------------------------------------

#[test]
fn deliveries_fill_the_client_receive_window_then_queue_and_drain_on_acks() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c").receive_maximum(3));
    let now = conn.at(1);
    conn.deliver_all(
        now,
        (0..5)
            .map(|i| {
                let expected = if i < 3 {
                    Enqueued::Sent
                } else {
                    Enqueued::Queued
                };
                (delivery("t", Q1, &format!("m{i}")), expected)
            })
            .collect(),
    );
    let out = conn.out(now);
    let sent: Vec<_> = out
        .publishes()
        .iter()
        .map(|p| (p.packet_id, p.payload.clone(), p.dup, p.qos))
        .collect();
    assert_eq!(
        sent,
        vec![
            (Some(pid(1)), bytes("m0"), false, Q1),
            (Some(pid(2)), bytes("m1"), false, Q1),
            (Some(pid(3)), bytes("m2"), false, Q1),
        ]
    );
    let session = conn.server.session().unwrap();
    assert_eq!(session.in_flight().count(), 3);
    assert_eq!(session.queued().count(), 2);

    conn.send(conn.at(2), puback(2));
    let out = conn.out(conn.at(2));
    let [Packet::Publish(p)] = &out.packets[..] else {
        panic!("{:?}", out.packets)
    };
    assert_eq!(
        (p.packet_id, p.payload.as_ref()),
        (Some(pid(4)), &b"m3"[..])
    );
    let [Event::Delivered {
        packet_id,
        reason,
        delivery,
    }] = &out.events[..]
    else {
        panic!("{:?}", out.events)
    };
    assert_eq!((*packet_id, *reason), (pid(2), R::Success));
    assert_eq!(delivery.message.payload, "m1");

    conn.send(conn.at(3), puback(1));
    let out = conn.out(conn.at(3));
    assert_eq!(out.publishes()[0].packet_id, Some(pid(5)));
    for id in [3, 4, 5] {
        conn.send(conn.at(4), puback(id));
    }
    let out = conn.out(conn.at(4));
    assert!(out.packets.is_empty());
    assert_eq!(out.events.len(), 3);
    let session = conn.server.session().unwrap();
    assert_eq!(session.in_flight().count(), 0);
    assert_eq!(session.queued().count(), 0);
}

#[test]
fn window_is_capped_by_max_inflight_messages() {
    let config = ServerConfig {
        max_inflight_messages: 2,
        ..config()
    };
    for connect in [
        ConnectBuilder::v5("c").receive_maximum(100),
        ConnectBuilder::v5("c"),
        ConnectBuilder::v311("c"),
    ] {
        let mut conn = Conn::open(config.clone(), connect);
        let now = conn.at(1);
        conn.deliver_all(
            now,
            vec![
                (delivery("t", Q1, "a"), Enqueued::Sent),
                (delivery("t", Q2, "b"), Enqueued::Sent),
                (delivery("t", Q1, "c"), Enqueued::Queued),
                // QoS 0 does not use the window.
                (delivery("t", Q0, "d"), Enqueued::Sent),
            ],
        );
        assert_eq!(conn.out(now).publishes().len(), 3);
    }
}

#[test]
fn a_full_queue_drops_the_newest_message() {
    let clock = Clock::new();
    let limits = QueueLimits {
        max_messages: 2,
        max_bytes: 0,
    };
    let session = Session::new(client_id("c"), 0, limits);
    let (mut conn, _) = Conn::open_with(
        clock,
        config(),
        clock.t0(),
        ConnectBuilder::v5("c").receive_maximum(1),
        Some(session),
    );
    let now = clock.at(1);
    conn.deliver_all(
        now,
        vec![
            (delivery("t", Q1, "m0"), Enqueued::Sent),
            (delivery("t", Q1, "m1"), Enqueued::Queued),
            (delivery("t", Q1, "m2"), Enqueued::Queued),
            (delivery("t", Q1, "m3"), Enqueued::QueueFull),
        ],
    );
    assert_eq!(conn.server.session().unwrap().drops().queue_full, 1);
    conn.out(now);
    conn.send(now, puback(1));
    let out = conn.out(now);
    assert_eq!(out.publishes()[0].payload, "m1");

    // By bytes: topic and payload count.
    let limits = QueueLimits {
        max_messages: 100,
        max_bytes: 10,
    };
    let session = Session::new(client_id("c"), 0, limits);
    let (mut conn, _) = Conn::open_with(
        clock,
        config(),
        clock.t0(),
        ConnectBuilder::v5("c").receive_maximum(1),
        Some(session),
    );
    conn.deliver_all(
        now,
        vec![
            (delivery("t", Q1, "0000"), Enqueued::Sent),
            (delivery("t", Q1, "1111"), Enqueued::Queued),
            (delivery("t", Q1, "2222"), Enqueued::Queued),
            (delivery("t", Q1, "3333"), Enqueued::QueueFull),
        ],
    );
    let session = conn.server.session().unwrap();
    assert_eq!(session.queued_bytes(), 10);
    assert_eq!(session.drops().queue_full, 1);
}

#[test]
fn expired_messages_are_dropped_and_the_remaining_expiry_is_sent() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c").receive_maximum(1));
    let clock = conn.clock;
    conn.deliver_all(
        clock.t0(),
        vec![
            (delivery("t", Q1, "m0"), Enqueued::Sent),
            (expiring("t", Q1, "m1", clock.at(10)), Enqueued::Queued),
            (expiring("t", Q1, "m2", clock.at(100)), Enqueued::Queued),
        ],
    );
    conn.out(clock.t0());

    // At 20 s, m1 has expired in the queue; m2 goes out with 80 s left.
    conn.send(clock.at(20), puback(1));
    let out = conn.out(clock.at(20));
    let [Packet::Publish(p)] = &out.packets[..] else {
        panic!("{:?}", out.packets)
    };
    assert_eq!(p.payload, "m2");
    assert_eq!(p.properties.message_expiry_interval, Some(80));
    assert_eq!(conn.server.session().unwrap().drops().expired, 1);

    // Already expired when handed over.
    assert_eq!(
        conn.server
            .deliver(clock.at(20), expiring("t", Q0, "late", clock.at(15))),
        Enqueued::Expired
    );
    // Rounded up: 29.5 s left is sent as 30.
    assert_eq!(
        conn.server
            .deliver(clock.at_ms(20_500), expiring("t", Q0, "x", clock.at(50))),
        Enqueued::Sent
    );
    let out = conn.out(clock.at(21));
    assert_eq!(
        out.publishes()[0].properties.message_expiry_interval,
        Some(30)
    );
}

#[test]
fn qos2_to_the_client_runs_pubrec_pubrel_pubcomp() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c").receive_maximum(1));
    let now = conn.at(1);
    conn.deliver_all(
        now,
        vec![
            (delivery("t", Q2, "first"), Enqueued::Sent),
            (delivery("t", Q2, "second"), Enqueued::Queued),
        ],
    );
    let out = conn.out(now);
    assert_eq!(out.publishes()[0].qos, Q2);
    assert_eq!(out.publishes()[0].packet_id, Some(pid(1)));

    conn.send(now, pubrec(1));
    let out = conn.out(now);
    assert_eq!(out.raw(), vec![vec![0x62, 2, 0, 1]]);
    assert_eq!(
        out.events,
        vec![Event::Released {
            packet_id: pid(1),
            store_seq: None
        }]
    );
    // The message still holds its slot until PUBCOMP.
    assert_eq!(conn.server.session().unwrap().queued().count(), 1);

    conn.send(now, pubcomp(1));
    let out = conn.out(now);
    assert!(matches!(
        only_event(&out),
        Event::Delivered { packet_id, reason: R::Success, delivery }
            if *packet_id == pid(1) && delivery.message.payload == "first"
    ));
    assert_eq!(out.publishes()[0].payload, "second");
    assert_eq!(out.publishes()[0].packet_id, Some(pid(2)));
}

#[test]
fn pubrec_with_an_error_ends_the_flow() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c").receive_maximum(1));
    let now = conn.at(1);
    conn.deliver_all(
        now,
        vec![
            (delivery("t", Q2, "refused"), Enqueued::Sent),
            (delivery("t", Q2, "next"), Enqueued::Queued),
        ],
    );
    conn.out(now);
    conn.send(now, Packet::PubRec(pub_response(1, R::NotAuthorized)));
    let out = conn.out(now);
    // No PUBREL; the window moves on.
    assert_eq!(out.packets.len(), 1, "{:?}", out.packets);
    assert_eq!(out.publishes()[0].payload, "next");
    assert!(matches!(
        only_event(&out),
        Event::Delivered { packet_id, reason: R::NotAuthorized, .. } if *packet_id == pid(1)
    ));
    // A late PUBCOMP for it is ignored.
    conn.send(now, pubcomp(1));
    assert!(conn.out(now).is_empty());
    // A PUBREC for an identifier the server never used is answered so the client can finish.
    conn.send(now, pubrec(77));
    assert_eq!(conn.out(now).raw(), vec![vec![0x62, 3, 0, 77, 0x92]]);
}

#[test]
fn reconnect_resends_unacknowledged_messages_in_order_with_dup_then_the_queue() {
    let clock = Clock::new();
    let connect = || {
        ConnectBuilder::v5("c")
            .clean_start(false)
            .session_expiry(300)
            .topic_alias_maximum(4)
    };
    let (mut conn, _) = Conn::open_with(clock, config(), clock.t0(), connect(), None);
    let now = clock.at(1);
    conn.deliver_all(
        now,
        vec![
            (delivery("t/1", Q1, "m1"), Enqueued::Sent),
            (delivery("t/2", Q2, "m2"), Enqueued::Sent),
            (delivery("t/3", Q2, "m3"), Enqueued::Sent),
            (delivery("t/4", Q1, "m4"), Enqueued::Sent),
            (delivery("t/5", Q0, "m5"), Enqueued::Sent),
        ],
    );
    let out = conn.out(now);
    assert_eq!(out.publishes().len(), 5);
    conn.send(clock.at(2), pubrec(2));
    conn.send(clock.at(2), puback(4));
    let out = conn.out(clock.at(2));
    assert_eq!(out.raw(), vec![vec![0x62, 2, 0, 2]]);

    conn.server.connection_lost(clock.at(3));
    assert_eq!(
        conn.out(clock.at(3)).events,
        vec![closed(R::UnspecifiedError, true)]
    );
    // Routed while the client is away: kept in the session.
    assert_eq!(
        conn.server.deliver(clock.at(4), delivery("t/6", Q1, "m6")),
        Enqueued::Queued
    );
    let session = conn.take_session();
    assert_eq!(
        conn.server.deliver(clock.at(4), delivery("t", Q1, "x")),
        Enqueued::NotConnected
    );

    let (mut conn, out) = Conn::open_with(clock, config(), clock.at(10), connect(), Some(session));
    assert!(conn.connack().session_present);
    // [MQTT-4.4.0-1]: the original order, PUBLISH with DUP, PUBREL for what was received.
    let summary: Vec<String> = out.packets[1..]
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => format!(
                "PUBLISH {} dup={} {}",
                p.packet_id.map_or(0, PacketId::get),
                p.dup,
                String::from_utf8_lossy(&p.payload)
            ),
            Packet::PubRel(r) => format!("PUBREL {}", r.packet_id),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "PUBLISH 1 dup=true m1",
            "PUBREL 2",
            "PUBLISH 3 dup=true m3",
            "PUBLISH 5 dup=false m6",
        ]
    );
    // Aliases do not survive a connection: every topic is spelled out again.
    assert!(out.publishes().iter().all(|p| !p.topic.is_empty()));
    assert_eq!(out.topics, [topic("t/1"), topic("t/3"), topic("t/6")]);

    conn.send(clock.at(11), puback(1));
    conn.send(clock.at(11), pubcomp(2));
    conn.send(clock.at(11), pubrec(3));
    conn.send(clock.at(11), pubcomp(3));
    conn.send(clock.at(11), puback(5));
    let out = conn.out(clock.at(11));
    assert_eq!(out.raw(), vec![vec![0x62, 2, 0, 3]]);
    let finished: Vec<_> = out
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Delivered { packet_id, .. } => Some(packet_id.get()),
            _ => None,
        })
        .collect();
    assert_eq!(finished, [1, 2, 3, 5]);
    assert_eq!(conn.server.session().unwrap().in_flight().count(), 0);
}

#[test]
fn resend_order_follows_sending_order_across_identifier_wrap_around() {
    let clock = Clock::new();
    let connect = || {
        ConnectBuilder::v5("c")
            .clean_start(false)
            .session_expiry(300)
    };
    let (mut conn, _) = Conn::open_with(clock, config(), clock.t0(), connect(), None);
    let now = clock.at(1);
    let server = &mut conn.server;
    for id in 1..=65533u16 {
        assert_eq!(server.deliver(now, delivery("t", Q1, "x")), Enqueued::Sent);
        assert!(
            matches!(server.poll_transmit(), Some(Packet::Publish(p)) if p.packet_id == Some(pid(id)))
        );
        server.handle_packet(now, puback(id));
        while server.poll_event().is_some() {}
    }
    for payload in ["a", "b", "c"] {
        assert_eq!(
            server.deliver(now, delivery("t", Q1, payload)),
            Enqueued::Sent
        );
    }
    let out = conn.out(now);
    let ids: Vec<_> = out
        .publishes()
        .iter()
        .map(|p| p.packet_id.unwrap().get())
        .collect();
    assert_eq!(ids, [65534, 65535, 1]);
    conn.server.connection_lost(clock.at(2));
    let session = conn.take_session();

    let (_, out) = Conn::open_with(clock, config(), clock.at(3), connect(), Some(session));
    let resent: Vec<_> = out
        .publishes()
        .iter()
        .map(|p| (p.packet_id.unwrap().get(), p.payload.clone()))
        .collect();
    assert_eq!(
        resent,
        [(65534, bytes("a")), (65535, bytes("b")), (1, bytes("c"))]
    );
}

#[test]
fn reconnect_with_a_smaller_receive_maximum_resends_only_what_the_window_allows() {
    let clock = Clock::new();
    let (mut conn, _) = Conn::open_with(
        clock,
        config(),
        clock.t0(),
        ConnectBuilder::v5("c")
            .clean_start(false)
            .session_expiry(300),
        None,
    );
    let now = clock.at(1);
    for i in 0..4 {
        assert_eq!(
            conn.server
                .deliver(now, delivery("t", Q1, &format!("m{i}"))),
            Enqueued::Sent
        );
    }
    conn.out(now);
    conn.server.connection_lost(clock.at(2));
    let session = conn.take_session();

    let connect = ConnectBuilder::v5("c")
        .clean_start(false)
        .session_expiry(300)
        .receive_maximum(2);
    let (mut conn, out) = Conn::open_with(clock, config(), clock.at(3), connect, Some(session));
    // [MQTT-3.3.4-9]: the window of the new connection applies to resent messages too.
    let resent: Vec<_> = out
        .publishes()
        .iter()
        .map(|p| (p.packet_id.unwrap().get(), p.dup))
        .collect();
    assert_eq!(resent, [(1, true), (2, true)]);
    conn.send(clock.at(4), puback(1));
    let out = conn.out(clock.at(4));
    let resent: Vec<_> = out
        .publishes()
        .iter()
        .map(|p| (p.packet_id.unwrap().get(), p.dup))
        .collect();
    assert_eq!(resent, [(3, true)]);
    conn.send(clock.at(4), puback(2));
    conn.send(clock.at(4), puback(3));
    let out = conn.out(clock.at(4));
    let resent: Vec<_> = out
        .publishes()
        .iter()
        .map(|p| (p.packet_id.unwrap().get(), p.dup))
        .collect();
    assert_eq!(resent, [(4, true)]);
}

#[test]
fn nothing_is_resent_on_a_timer() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c"));
    let now = conn.at(1);
    conn.deliver_all(
        now,
        vec![
            (delivery("t", Q1, "x"), Enqueued::Sent),
            (delivery("t", Q2, "y"), Enqueued::Sent),
        ],
    );
    conn.out(now);
    // [MQTT-4.4.0-1]: resending happens on reconnect only.
    assert_eq!(conn.server.poll_timeout(), None);
    conn.server.handle_timeout(conn.at(3600));
    assert!(conn.out(conn.at(3600)).is_empty());

    // With a keep alive, the client's pings are all that is answered.
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c").keep_alive(60));
    assert_eq!(
        conn.server.deliver(now, delivery("t", Q1, "x")),
        Enqueued::Sent
    );
    conn.out(now);
    for minute in 1..=10 {
        let t = conn.at(minute * 60);
        advance(&mut conn.server, t);
        conn.send(t, Packet::PingReq);
        assert_eq!(conn.out(t).raw(), vec![vec![0xD0, 0]]);
    }
}

// ---------------------------------------------------------------------------------------------
// Maximum packet size towards the client
// ---------------------------------------------------------------------------------------------

/// The size of the PUBLISH the server would send for a message on `topic_name`.
fn publish_len(topic_name: &str, qos: QoS, payload: &str, alias: Option<u16>) -> usize {
    let mut p = publish(topic_name, qos, 1, payload);
    p.properties.topic_alias = alias.map(|a| NonZeroU16::new(a).unwrap());
    Packet::Publish(p).encoded_len(V5)
}

#[test]
fn messages_larger_than_the_client_maximum_packet_size_are_dropped() {
    let mut conn = Conn::open(
        config(),
        ConnectBuilder::v5("c")
            .maximum_packet_size(64)
            .receive_maximum(1),
    );
    let now = conn.at(1);
    let big = "x".repeat(100);
    conn.deliver_all(
        now,
        vec![
            // [MQTT-3.1.2-24, MQTT-3.1.2-25]
            (delivery("t", Q1, &big), Enqueued::TooLarge),
            (delivery("t", Q0, &big), Enqueued::TooLarge),
            (delivery("t", Q1, "small"), Enqueued::Sent),
            (delivery("t", Q1, &big), Enqueued::Queued),
            (delivery("t", Q1, "small too"), Enqueued::Queued),
        ],
    );
    assert_eq!(conn.out(now).publishes().len(), 1);
    conn.send(now, puback(1));
    let out = conn.out(now);
    // The large one is dropped on its way out of the queue; the next one flows.
    assert_eq!(out.publishes().len(), 1);
    assert_eq!(out.publishes()[0].payload, "small too");
    assert_eq!(conn.server.session().unwrap().drops().too_large, 3);
}

#[test]
fn messages_exactly_at_the_client_maximum_packet_size_are_sent() {
    for qos in [Q0, Q1, Q2] {
        let payload = "p".repeat(40);
        let max = publish_len("t", qos, &payload, None) as u32;
        let mut conn = Conn::open(config(), ConnectBuilder::v5("c").maximum_packet_size(max));
        let now = conn.at(1);
        assert_eq!(
            conn.server.deliver(now, delivery("t", qos, &payload)),
            Enqueued::Sent,
            "{qos:?}, {max} bytes"
        );
        assert_eq!(conn.out(now).wire[0].len(), max as usize);
        assert_eq!(
            conn.server
                .deliver(now, delivery("t", qos, &format!("{payload}!"))),
            Enqueued::TooLarge,
            "{qos:?}"
        );
    }
}

#[test]
fn a_topic_alias_never_pushes_a_publish_over_the_client_maximum_packet_size() {
    // User properties bring the property length to 125 bytes, so that the 3 bytes of a topic
    // alias also lengthen the property length field (1 -> 2 bytes).
    let mut m = Message::new(topic("t"), bytes("p"), Q1, false);
    m.properties.user_properties = vec![(s("k"), s(&"v".repeat(125 - 6)))];
    let m = Arc::new(m);
    let d = mqttd_proto::Delivery::new(m.clone());
    let mut probe = publish("t", Q1, 1, "p");
    probe.properties.user_properties = m.properties.user_properties.clone();
    let plain = Packet::Publish(probe.clone()).encoded_len(V5);
    probe.properties.topic_alias = NonZeroU16::new(1);
    let aliased = Packet::Publish(probe).encoded_len(V5);
    assert_eq!(aliased, plain + 4, "test setup");

    for max in [plain, plain + 1, plain + 2, plain + 3, aliased] {
        let mut conn = Conn::open(
            config(),
            ConnectBuilder::v5("c")
                .maximum_packet_size(max as u32)
                .topic_alias_maximum(4),
        );
        let now = conn.at(1);
        let outcome = conn.server.deliver(now, d.clone());
        // Whatever is sent must fit; `out` reads it with the client's limit.
        let out = conn.out(now);
        match outcome {
            Enqueued::Sent => assert!(out.wire[0].len() <= max),
            Enqueued::TooLarge => assert!(out.packets.is_empty()),
            other => panic!("{other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Topic aliases
// ---------------------------------------------------------------------------------------------

#[test]
fn client_topic_alias_is_set_then_resolved() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c"));
    let now = conn.at(1);
    conn.send(now, Packet::Publish(publish_aliased("a/b", 1, Q0, 0, "1")));
    conn.send(now, Packet::Publish(publish_aliased("", 1, Q1, 5, "2")));
    // Reassigned to another topic.
    conn.send(now, Packet::Publish(publish_aliased("c", 1, Q0, 0, "3")));
    conn.send(now, Packet::Publish(publish_aliased("", 1, Q0, 0, "4")));
    let out = conn.out(now);
    let topics: Vec<_> = out
        .events
        .iter()
        .map(|e| match e {
            Event::Publish(p) => p.message.topic.to_string(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(topics, ["a/b", "a/b", "c", "c"]);
    assert!(conn.server.is_connected());
}

#[test]
fn client_topic_alias_above_the_server_maximum_is_0x94() {
    for (max, alias) in [(2, 3), (0, 1)] {
        let config = ServerConfig {
            topic_alias_maximum: max,
            ..config()
        };
        let mut conn = Conn::open(config, ConnectBuilder::v5("c"));
        let now = conn.at(1);
        conn.send(
            now,
            Packet::Publish(publish_aliased("a", alias, Q0, 0, "x")),
        );
        let out = conn.out(now);
        // The client broke [MQTT-3.3.2-9] (section 3.3.2.3.4).
        assert_eq!(out.raw(), vec![vec![0xE0, 1, 0x94]], "max {max}");
        assert_eq!(out.events, vec![closed(R::TopicAliasInvalid, false)]);
    }
}

#[test]
fn client_topic_alias_used_before_it_was_set_is_a_protocol_error() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c"));
    let now = conn.at(1);
    conn.send(now, Packet::Publish(publish_aliased("", 1, Q0, 0, "x")));
    let out = conn.out(now);
    assert_eq!(out.raw(), vec![vec![0xE0, 1, 0x82]]);
    assert_eq!(out.events, vec![closed(R::ProtocolError, false)]);
}

#[test]
fn server_assigns_topic_aliases_up_to_the_client_maximum() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c").topic_alias_maximum(2));
    let now = conn.at(1);
    for t in ["x", "x", "y", "x", "z", "x", "y", "z", "z"] {
        assert_eq!(conn.server.deliver(now, delivery(t, Q0, t)), Enqueued::Sent);
    }
    let out = conn.out(now);
    let p = out.publishes();
    // First send: the topic and the alias; then the alias alone.
    assert_eq!(
        (p[0].topic.as_str(), p[0].properties.topic_alias),
        ("x", NonZeroU16::new(1))
    );
    assert_eq!(
        (p[1].topic.as_str(), p[1].properties.topic_alias),
        ("", NonZeroU16::new(1))
    );
    assert_eq!(
        (p[2].topic.as_str(), p[2].properties.topic_alias),
        ("y", NonZeroU16::new(2))
    );
    // Every PUBLISH resolves, as the client tracks them, to the topic delivered.
    let expected: Vec<_> = p
        .iter()
        .map(|p| topic(std::str::from_utf8(&p.payload).unwrap()))
        .collect();
    assert_eq!(out.topics, expected);
}

#[test]
fn no_topic_aliases_towards_clients_that_did_not_allow_them() {
    for connect in [
        ConnectBuilder::v5("c"),
        ConnectBuilder::v5("c").topic_alias_maximum(0),
        ConnectBuilder::v311("c"),
    ] {
        let mut conn = Conn::open(config(), connect);
        let now = conn.at(1);
        for _ in 0..3 {
            assert_eq!(
                conn.server.deliver(now, delivery("a/b", Q1, "x")),
                Enqueued::Sent
            );
        }
        let out = conn.out(now);
        assert!(out
            .publishes()
            .iter()
            .all(|p| p.topic.as_str() == "a/b" && p.properties.topic_alias.is_none()));
    }
}

// ---------------------------------------------------------------------------------------------
// Will and session expiry
// ---------------------------------------------------------------------------------------------

#[test]
fn will_is_published_when_the_connection_is_lost() {
    let mut w = will("status/c", "lost", Q1);
    w.retain = true;
    w.properties.message_expiry_interval = Some(600);
    w.properties.content_type = Some(s("text/plain"));
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c").session_expiry(60).will(w));
    let lost = conn.at(7);
    conn.server.connection_lost(lost);
    let out = conn.out(lost);
    assert!(out.packets.is_empty());
    assert_eq!(out.events, vec![closed(R::UnspecifiedError, true)]);

    let mut session = conn.take_session();
    assert_eq!(
        session.poll_timeout(),
        Some(lost),
        "no will delay: due at once"
    );
    let [(at, SessionEvent::WillDue(m))] = &session_timers(&mut session, lost)[..] else {
        panic!()
    };
    assert_eq!(*at, lost);
    assert_eq!(m.topic, topic("status/c"));
    assert_eq!(m.payload, "lost");
    assert_eq!((m.qos, m.retain), (Q1, true));
    assert_eq!(m.expires_at, Some(lost + Duration::from_secs(600)));
    assert_eq!(m.properties.content_type, Some(s("text/plain")));
    // Then the session expires, will already gone.
    assert_eq!(
        session_timers(&mut session, conn.at(67)),
        vec![(conn.at(67), SessionEvent::Expired { will: None })]
    );
}

#[test]
fn will_follows_the_disconnect_reason() {
    // 0x04: disconnect, and publish the will.
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c").will(will("w", "x", Q0)));
    let now = conn.at(1);
    conn.send(now, disconnect(R::DisconnectWithWillMessage));
    let out = conn.out(now);
    assert!(out.packets.is_empty());
    assert_eq!(out.events, vec![closed(R::DisconnectWithWillMessage, true)]);
    let mut session = conn.take_session();
    assert!(will_due(&mut session, now).is_some());

    // 0x00 (and MQTT 3's DISCONNECT): the will is discarded [MQTT-3.1.2-10].
    for connect in [ConnectBuilder::v5("c"), ConnectBuilder::v311("c")] {
        let mut conn = Conn::open(
            config(),
            connect.will(will("w", "x", Q0)).session_expiry(10),
        );
        conn.send(now, disconnect(R::Success));
        let out = conn.out(now);
        assert!(out.packets.is_empty());
        assert_eq!(out.events, vec![closed(R::Success, true)]);
        let mut session = conn.take_session();
        assert!(!session.has_pending_will());
        let fired = session_timers(&mut session, conn.at(3600));
        assert!(
            fired
                .iter()
                .all(|(_, e)| *e == SessionEvent::Expired { will: None }),
            "{fired:?}"
        );
    }
}

#[test]
fn will_delay_is_honoured_and_capped_by_session_expiry() {
    // Delay 30 s, session 100 s: the will at 30 s, the session at 100 s.
    let mut conn = Conn::open(
        config(),
        ConnectBuilder::v5("c")
            .session_expiry(100)
            .will(delayed_will("w", "late", 30)),
    );
    conn.server.connection_lost(conn.at(5));
    let mut session = conn.take_session();
    assert!(session_timers(&mut session, conn.at(34)).is_empty());
    let fired = session_timers(&mut session, conn.at(200));
    assert_eq!(fired.len(), 2, "{fired:?}");
    assert!(
        matches!(&fired[0], (at, SessionEvent::WillDue(m)) if *at == conn.at(35) && m.payload == "late")
    );
    assert_eq!(
        fired[1],
        (conn.at(105), SessionEvent::Expired { will: None })
    );

    // Delay 100 s, session 30 s: the will goes out when the session ends (section 3.1.3.2.2).
    let mut conn = Conn::open(
        config(),
        ConnectBuilder::v5("c")
            .session_expiry(30)
            .will(delayed_will("w", "late", 100)),
    );
    conn.server.connection_lost(conn.at(5));
    let mut session = conn.take_session();
    assert!(session_timers(&mut session, conn.at(34)).is_empty());
    let fired = session_timers(&mut session, conn.at(200));
    let [(at, SessionEvent::Expired { will: Some(m) })] = &fired[..] else {
        panic!("{fired:?}")
    };
    assert_eq!((*at, m.payload.as_ref()), (conn.at(35), &b"late"[..]));

    // Session expiry 0 with a delay: published when the connection closes.
    let mut conn = Conn::open(
        config(),
        ConnectBuilder::v5("c").will(delayed_will("w", "late", 100)),
    );
    conn.server.connection_lost(conn.at(5));
    let mut session = conn.take_session();
    assert!(will_due(&mut session, conn.at(5)).is_some());
}

#[test]
fn delayed_will_is_cancelled_when_the_session_is_resumed_in_time() {
    let clock = Clock::new();
    let connect = |w: bool| {
        let c = ConnectBuilder::v5("c")
            .clean_start(false)
            .session_expiry(300);
        if w {
            c.will(delayed_will("w", "late", 60))
        } else {
            c
        }
    };
    let (mut conn, _) = Conn::open_with(clock, config(), clock.t0(), connect(true), None);
    conn.server.connection_lost(clock.at(5));
    let mut session = conn.take_session();
    assert!(session_timers(&mut session, clock.at(15)).is_empty());
    assert!(session.has_pending_will());

    let (mut conn, _) =
        Conn::open_with(clock, config(), clock.at(15), connect(false), Some(session));
    let session = conn.server.session().unwrap();
    assert!(!session.has_pending_will(), "[MQTT-3.1.3-9]");
    assert_eq!(session.poll_timeout(), None);

    // The second connection ends normally: nothing of the first will remains.
    conn.send(clock.at(20), disconnect(R::Success));
    conn.out(clock.at(20));
    let mut session = conn.take_session();
    assert_eq!(
        session_timers(&mut session, clock.at(1000)),
        vec![(clock.at(320), SessionEvent::Expired { will: None })]
    );
}

#[test]
fn session_expiry_in_disconnect() {
    // Zero at CONNECT, non-zero at DISCONNECT: a protocol error [MQTT-3.14.2-2].
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c").will(will("w", "x", Q0)));
    let now = conn.at(1);
    conn.send(
        now,
        Packet::Disconnect(Disconnect {
            reason: R::Success,
            properties: DisconnectProperties {
                session_expiry_interval: Some(10),
                ..DisconnectProperties::default()
            },
        }),
    );
    let out = conn.out(now);
    assert_eq!(out.raw(), vec![vec![0xE0, 1, 0x82]]);
    assert_eq!(out.events, vec![closed(R::ProtocolError, false)]);
    let mut session = conn.take_session();
    assert!(
        will_due(&mut session, now).is_some(),
        "not a normal disconnect"
    );

    // Otherwise the DISCONNECT's value replaces CONNECT's, within the server's maximum.
    let config = ServerConfig {
        max_session_expiry: 100,
        ..config()
    };
    for (asked, kept) in [(0, 0), (50, 50), (1000, 100)] {
        let mut conn = Conn::open(config.clone(), ConnectBuilder::v5("c").session_expiry(10));
        conn.send(
            now,
            Packet::Disconnect(Disconnect {
                reason: R::Success,
                properties: DisconnectProperties {
                    session_expiry_interval: Some(asked),
                    ..DisconnectProperties::default()
                },
            }),
        );
        assert_eq!(conn.out(now).events, vec![closed(R::Success, true)]);
        let mut session = conn.take_session();
        assert_eq!(session.expiry_interval(), kept);
        let expires = now + Duration::from_secs(kept.into());
        assert_eq!(
            session_timers(&mut session, conn.at(10_000)),
            vec![(expires, SessionEvent::Expired { will: None })]
        );
    }
}

#[test]
fn sessions_expire_after_their_interval() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c").session_expiry(60));
    conn.server.connection_lost(conn.at(5));
    let mut session = conn.take_session();
    assert_eq!(session.poll_timeout(), Some(conn.at(65)));
    assert_eq!(session.handle_timeout(conn.at(64)), None);
    assert_eq!(
        session.handle_timeout(conn.at(65)),
        Some(SessionEvent::Expired { will: None })
    );
    assert_eq!(session.poll_timeout(), None);

    // Never.
    let mut conn = Conn::open(
        config(),
        ConnectBuilder::v5("c").session_expiry(NEVER_EXPIRES),
    );
    conn.server.connection_lost(conn.at(5));
    assert_eq!(conn.take_session().poll_timeout(), None);

    // MQTT 3.1.1: clean session ends with the connection; a persistent one lasts
    // `v3_session_expiry`.
    let config = ServerConfig {
        v3_session_expiry: 3600,
        ..config()
    };
    let mut conn = Conn::open(config.clone(), ConnectBuilder::v311("c"));
    conn.server.connection_lost(conn.at(5));
    assert_eq!(conn.take_session().poll_timeout(), Some(conn.at(5)));
    let mut conn = Conn::open(config, ConnectBuilder::v311("c").clean_start(false));
    conn.server.connection_lost(conn.at(5));
    assert_eq!(conn.take_session().poll_timeout(), Some(conn.at(3605)));
}

#[test]
fn will_qos_and_retain_must_be_supported() {
    let config = ServerConfig {
        maximum_qos: Q1,
        retain_available: false,
        ..config()
    };
    let mut retained = will("w", "x", Q0);
    retained.retain = true;
    for (w, code) in [(will("w", "x", Q2), 0x9B), (retained, 0x9A)] {
        let clock = Clock::new();
        let mut conn = Conn::new(clock, config.clone(), clock.t0());
        conn.send(clock.t0(), ConnectBuilder::v5("c").will(w).packet());
        let out = conn.out(clock.t0());
        // [MQTT-3.2.2-12], [MQTT-3.2.2-13] (sections 3.2.2.3.4 and 3.2.2.3.5)
        assert_eq!(out.raw(), vec![vec![0x20, 3, 0, code, 0]]);
        assert!(conn.server.is_closed());
    }
}

// ---------------------------------------------------------------------------------------------
// Enhanced authentication
// ---------------------------------------------------------------------------------------------

#[test]
fn enhanced_authentication_exchange_during_connect() {
    let clock = Clock::new();
    let mut conn = Conn::new(clock, config(), clock.t0());
    let request = conn.connect(
        clock.t0(),
        ConnectBuilder::v5("c").auth("SCRAM-SHA-256", Some("client-first")),
    );
    assert_eq!(
        request.connect.properties.authentication_method,
        Some(s("SCRAM-SHA-256"))
    );
    assert_eq!(
        request.connect.properties.authentication_data,
        Some(bytes("client-first"))
    );

    conn.server
        .auth_continue(Some(bytes("server-first")))
        .unwrap();
    let out = conn.out(clock.at(1));
    assert_eq!(
        only(&out),
        &auth(
            R::ContinueAuthentication,
            Some("SCRAM-SHA-256"),
            Some("server-first")
        )
    );
    assert_eq!(out.wire[0][2], 0x18);

    conn.send(
        clock.at(2),
        auth(
            R::ContinueAuthentication,
            Some("SCRAM-SHA-256"),
            Some("client-final"),
        ),
    );
    let out = conn.out(clock.at(2));
    assert!(out.packets.is_empty());
    assert_eq!(
        out.events,
        vec![Event::AuthContinue {
            data: Some(bytes("client-final"))
        }]
    );

    let mut accept = Accept::new(
        Session::new(client_id("c"), 0, QueueLimits::default()),
        false,
    );
    accept.authentication_data = Some(bytes("server-final"));
    let out = conn.accept(clock.at(3), accept);
    let Packet::ConnAck(ack) = only(&out) else {
        unreachable!()
    };
    assert_eq!(
        ack.properties.authentication_method,
        Some(s("SCRAM-SHA-256"))
    );
    assert_eq!(
        ack.properties.authentication_data,
        Some(bytes("server-final"))
    );
}

#[test]
fn enhanced_authentication_with_the_wrong_method_or_reason_closes() {
    for bad in [
        auth(R::ContinueAuthentication, Some("OTHER"), Some("x")),
        auth(R::ContinueAuthentication, None, Some("x")),
        auth(R::ReAuthenticate, Some("SCRAM"), Some("x")),
    ] {
        let clock = Clock::new();
        let mut conn = Conn::new(clock, config(), clock.t0());
        conn.connect(clock.t0(), ConnectBuilder::v5("c").auth("SCRAM", None));
        conn.server.auth_continue(None).unwrap();
        conn.out(clock.t0());
        conn.send(clock.at(1), bad.clone());
        let out = conn.out(clock.at(1));
        assert!(
            !out.packets
                .iter()
                .any(|p| matches!(p, Packet::ConnAck(a) if a.reason == R::Success)),
            "{bad:?}"
        );
        assert!(!out
            .packets
            .iter()
            .any(|p| matches!(p, Packet::Disconnect(_))));
        assert!(conn.server.is_closed(), "{bad:?}");
    }
}

#[test]
fn auth_from_a_client_that_connected_without_a_method_is_a_protocol_error() {
    // Before CONNACK.
    let clock = Clock::new();
    let mut conn = Conn::new(clock, config(), clock.t0());
    conn.connect(clock.t0(), ConnectBuilder::v5("c"));
    conn.send(
        clock.t0(),
        auth(R::ContinueAuthentication, Some("SCRAM"), None),
    );
    assert!(conn.server.is_closed());
    let out = conn.out(clock.t0());
    assert!(!out
        .packets
        .iter()
        .any(|p| matches!(p, Packet::Disconnect(_))));
    assert_eq!(out.events, vec![closed(R::ProtocolError, false)]);

    // After.
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c"));
    let now = conn.at(1);
    conn.send(now, auth(R::ReAuthenticate, Some("SCRAM"), None));
    let out = conn.out(now);
    assert_eq!(out.raw(), vec![vec![0xE0, 1, 0x82]]);

    // Authentication data without a method in CONNECT (section 3.1.2.11.10).
    let mut connect = ConnectBuilder::v5("c");
    connect.0.properties.authentication_data = Some(bytes("x"));
    let mut conn = Conn::new(clock, config(), clock.t0());
    conn.send(clock.t0(), connect.packet());
    assert_eq!(conn.out(clock.t0()).raw(), vec![vec![0x20, 3, 0, 0x82, 0]]);
}

#[test]
fn re_authentication() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c").auth("TOKEN", Some("t1")));
    assert_eq!(
        conn.connack().properties.authentication_method,
        Some(s("TOKEN"))
    );
    let now = conn.at(10);
    assert_eq!(
        conn.server.reauth_success(None),
        Err(StateError::NotReauthenticating)
    );

    conn.send(now, auth(R::ReAuthenticate, Some("TOKEN"), Some("t2")));
    let out = conn.out(now);
    assert!(out.packets.is_empty());
    assert_eq!(
        out.events,
        vec![Event::ReAuthenticate {
            data: Some(bytes("t2"))
        }]
    );
    // Traffic goes on meanwhile.
    conn.send(now, Packet::Publish(publish("a", Q0, 0, "x")));
    assert!(matches!(only_event(&conn.out(now)), Event::Publish(_)));

    conn.server.auth_continue(Some(bytes("challenge"))).unwrap();
    assert_eq!(
        only(&conn.out(now)),
        &auth(R::ContinueAuthentication, Some("TOKEN"), Some("challenge"))
    );
    conn.send(
        now,
        auth(R::ContinueAuthentication, Some("TOKEN"), Some("response")),
    );
    assert_eq!(
        conn.out(now).events,
        vec![Event::AuthContinue {
            data: Some(bytes("response"))
        }]
    );
    conn.server.reauth_success(Some(bytes("ok"))).unwrap();
    let out = conn.out(now);
    assert_eq!(only(&out), &auth(R::Success, Some("TOKEN"), Some("ok")));
    assert_eq!(out.wire[0][2], 0x00);
    assert!(conn.server.is_connected());

    // A second round that fails: DISCONNECT with the broker's reason.
    conn.send(now, auth(R::ReAuthenticate, Some("TOKEN"), Some("t3")));
    conn.out(now);
    conn.server.reject(now, R::NotAuthorized).unwrap();
    let out = conn.out(now);
    assert_eq!(out.raw(), vec![vec![0xE0, 1, 0x87]]);

    // Another method than the one of CONNECT [MQTT-4.12.1-1].
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c").auth("TOKEN", None));
    conn.send(now, auth(R::ReAuthenticate, Some("OTHER"), None));
    assert_eq!(conn.out(now).raw(), vec![vec![0xE0, 1, 0x82]]);
}

// ---------------------------------------------------------------------------------------------
// SUBSCRIBE and UNSUBSCRIBE
// ---------------------------------------------------------------------------------------------

#[test]
fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c"));
    let now = conn.at(1);
    let mut sub = subscribe(1, &[("a/b", Q1), ("$share/g/a/#", Q1)]);
    sub.filters[1].options.no_local = true;
    conn.send(now, Packet::Subscribe(sub));
    let out = conn.out(now);
    // [MQTT-3.8.3-4]
    assert_eq!(out.raw(), vec![vec![0xE0, 1, 0x82]]);
    assert_eq!(out.events, vec![closed(R::ProtocolError, false)]);

    // no-local on an ordinary filter is fine.
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c"));
    let mut sub = subscribe(1, &[("a/b", Q1)]);
    sub.filters[0].options.no_local = true;
    conn.send(now, Packet::Subscribe(sub.clone()));
    assert_eq!(conn.out(now).events, vec![Event::Subscribe(sub)]);
}

/// Mosquitto's bridges connect with protocol level 0x84 (`try_private`); their subscriptions
/// are No Local and Retain As Published, as Mosquitto makes them, except shared ones.
#[test]
fn a_mosquitto_bridge_subscribes_with_no_local_and_retain_as_published() {
    let mut bridge = ConnectBuilder::v311("bridge");
    bridge.0.properties.bridge = true;
    let mut conn = Conn::open(config(), bridge);
    let now = conn.at(1);
    conn.send(
        now,
        Packet::Subscribe(subscribe(1, &[("a/#", Q1), ("$share/g/b", Q1)])),
    );
    let out = conn.out(now);
    let Event::Subscribe(sub) = only_event(&out) else {
        panic!("not a SUBSCRIBE");
    };
    let plain = sub.filters[0].options;
    assert!(plain.no_local && plain.retain_as_published, "{plain:?}");
    let shared = sub.filters[1].options;
    assert!(
        !shared.no_local && !shared.retain_as_published,
        "{shared:?}"
    );

    // An ordinary 3.1.1 client's subscriptions have neither.
    let mut conn = Conn::open(config(), ConnectBuilder::v311("client"));
    conn.send(now, Packet::Subscribe(subscribe(1, &[("a/#", Q1)])));
    let out = conn.out(now);
    let Event::Subscribe(sub) = only_event(&out) else {
        panic!("not a SUBSCRIBE");
    };
    assert!(!sub.filters[0].options.no_local);
}

#[test]
fn subscription_identifier_is_refused_when_not_supported() {
    let config = ServerConfig {
        subscription_identifiers_available: false,
        ..config()
    };
    let mut conn = Conn::open(config, ConnectBuilder::v5("c"));
    let now = conn.at(1);
    let mut sub = subscribe(1, &[("a", Q1)]);
    sub.properties.subscription_identifier = NonZeroU32::new(7);
    conn.send(now, Packet::Subscribe(sub.clone()));
    let out = conn.out(now);
    assert_eq!(out.raw(), vec![vec![0xE0, 1, 0xA1]]);

    // Supported: handed to the broker.
    let mut conn = Conn::open(ServerConfig::default(), ConnectBuilder::v5("c"));
    conn.send(now, Packet::Subscribe(sub.clone()));
    assert_eq!(conn.out(now).events, vec![Event::Subscribe(sub)]);
}

#[test]
fn suback_and_unsuback_in_each_version() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c"));
    let now = conn.at(1);
    conn.send(
        now,
        Packet::Subscribe(subscribe(7, &[("a", Q1), ("b", Q2)])),
    );
    assert!(matches!(only_event(&conn.out(now)), Event::Subscribe(s) if s.filters.len() == 2));
    conn.server
        .subscribe_ack(pid(7), vec![R::GrantedQoS1, R::NotAuthorized])
        .unwrap();
    assert_eq!(
        conn.out(now).raw(),
        vec![vec![0x90, 5, 0, 7, 0, 0x01, 0x87]]
    );
    conn.send(now, Packet::Unsubscribe(unsubscribe(8, &["a", "b"])));
    assert!(matches!(only_event(&conn.out(now)), Event::Unsubscribe(u) if u.packet_id == pid(8)));
    conn.server
        .unsubscribe_ack(pid(8), vec![R::Success, R::NoSubscriptionExisted])
        .unwrap();
    assert_eq!(
        conn.out(now).raw(),
        vec![vec![0xB0, 5, 0, 8, 0, 0x00, 0x11]]
    );

    // MQTT 3.1.1: any failure is 0x80; UNSUBACK has no payload.
    let mut conn = Conn::open(config(), ConnectBuilder::v311("c"));
    conn.send(
        now,
        Packet::Subscribe(subscribe(7, &[("a", Q2), ("b", Q1), ("c", Q0)])),
    );
    conn.out(now);
    conn.server
        .subscribe_ack(
            pid(7),
            vec![R::GrantedQoS2, R::TopicFilterInvalid, R::Success],
        )
        .unwrap();
    assert_eq!(
        conn.out(now).raw(),
        vec![vec![0x90, 5, 0, 7, 0x02, 0x80, 0x00]]
    );
    conn.send(now, Packet::Unsubscribe(unsubscribe(8, &["a"])));
    conn.out(now);
    conn.server
        .unsubscribe_ack(pid(8), vec![R::NoSubscriptionExisted])
        .unwrap();
    assert_eq!(conn.out(now).raw(), vec![vec![0xB0, 2, 0, 8]]);
}

// ---------------------------------------------------------------------------------------------
// Server-side close
// ---------------------------------------------------------------------------------------------

#[test]
fn takeover_sends_0x8e_and_publishes_the_will() {
    let mut conn = Conn::open(
        config(),
        ConnectBuilder::v5("c")
            .session_expiry(60)
            .will(will("w", "x", Q0)),
    );
    let now = conn.at(1);
    conn.server.disconnect(now, R::SessionTakenOver);
    let out = conn.out(now);
    // [MQTT-3.1.4-3]
    assert_eq!(out.raw(), vec![vec![0xE0, 1, 0x8E]]);
    assert_eq!(out.events, vec![closed(R::SessionTakenOver, false)]);
    let mut session = conn.take_session();
    assert!(will_due(&mut session, now).is_some());

    // Closing twice does nothing; MQTT 3 clients get no DISCONNECT.
    conn.server.disconnect(now, R::ServerShuttingDown);
    assert!(conn.out(now).is_empty());
    let mut conn = Conn::open(config(), ConnectBuilder::v311("c"));
    conn.server.disconnect(now, R::SessionTakenOver);
    let out = conn.out(now);
    assert!(out.packets.is_empty());
    assert_eq!(out.events, vec![closed(R::SessionTakenOver, false)]);
}

/// What a durable broker relies on: a stored QoS 2 message reports the packet identifier it
/// went out under before it leaves, PUBREC names the stored message, and a session rebuilt
/// from storage resumes each flow under its old identifier and state.
#[test]
fn stored_qos2_flows_report_their_identifiers_and_resume_after_a_restore() {
    let clock = Clock::new();
    let connect = || {
        ConnectBuilder::v5("c")
            .clean_start(false)
            .session_expiry(300)
    };
    let (mut conn, _) = Conn::open_with(clock, config(), clock.t0(), connect(), None);
    let now = clock.at(1);
    let stored = |payload: &str, seq: u64| {
        let mut d = delivery("t", Q2, payload);
        d.store_seq = Some(seq);
        d
    };
    conn.deliver_all(
        now,
        vec![
            (stored("a", 7), Enqueued::Sent),
            (delivery("t", Q2, "not stored"), Enqueued::Sent),
            (stored("b", 9), Enqueued::Sent),
        ],
    );
    let out = conn.out(now);
    assert_eq!(out.publishes().len(), 3);
    assert_eq!(
        out.events,
        vec![
            Event::Sent {
                packet_id: pid(1),
                store_seq: 7
            },
            Event::Sent {
                packet_id: pid(3),
                store_seq: 9
            },
        ],
        "only stored messages are reported, each with the identifier it went out under"
    );
    conn.send(now, pubrec(3));
    assert_eq!(
        conn.out(now).events,
        vec![Event::Released {
            packet_id: pid(3),
            store_seq: Some(9)
        }]
    );

    // The broker restarts: the session is rebuilt from what it stored.
    let mut session = Session::new(client_id("c"), 300, QueueLimits::default());
    session.restore_in_flight(pid(1), stored("a", 7), OutboundState::PublishSent);
    session.restore_in_flight(pid(3), stored("b", 9), OutboundState::ReleaseSent);
    session.restore_pending_release(pid(5));
    session.disconnected(clock.at(2), None);
    let (mut conn, out) = Conn::open_with(clock, config(), clock.at(3), connect(), Some(session));
    assert!(conn.connack().session_present);
    let resent = out.publishes();
    assert_eq!(resent.len(), 1, "{:?}", out.packets);
    assert_eq!(resent[0].packet_id, Some(pid(1)));
    assert!(resent[0].dup, "a resent PUBLISH has DUP set");
    assert!(
        out.packets
            .iter()
            .any(|p| matches!(p, Packet::PubRel(r) if r.packet_id == pid(3))),
        "a released flow resumes with PUBREL: {:?}",
        out.packets
    );
    // The incoming QoS 2 identifier still awaits PUBREL: its resend is a duplicate.
    conn.send(clock.at(3), Packet::Publish(publish("in", Q2, 5, "again")));
    let out = conn.out(clock.at(3));
    assert!(
        out.events.iter().all(|e| !matches!(e, Event::Publish(_))),
        "a duplicate QoS 2 PUBLISH is not delivered again: {:?}",
        out.events
    );
}

// ---------------------------------------------------------------------------------------------
// Parking
// ---------------------------------------------------------------------------------------------

impl Conn {
    /// Parks the connection and makes it again; whether it parked (its smallest form) or was
    /// given back as it was.
    fn park_and_unpark(&mut self) -> bool {
        let placeholder = ServerConnection::new(config(), self.clock.t0());
        let server = std::mem::replace(&mut self.server, placeholder);
        match server.park() {
            Ok(parked) => {
                let due = parked.poll_timeout();
                self.server = parked.unpark();
                assert_eq!(self.server.poll_timeout(), due, "the same keep alive");
                true
            }
            Err(server) => {
                self.server = server;
                false
            }
        }
    }
}

#[test]
fn an_idle_connection_parks_and_comes_back_the_same() {
    let mut conn = Conn::open(
        config(),
        ConnectBuilder::v5("c")
            .keep_alive(10)
            .session_expiry(60)
            .will(will("status/c", "lost", Q1)),
    );
    let clock = conn.clock;
    // A message goes and is acknowledged: nothing is left in flight.
    conn.deliver_all(clock.at(1), vec![(delivery("t", Q1, "m0"), Enqueued::Sent)]);
    let out = conn.out(clock.at(1));
    assert_eq!(out.publishes()[0].packet_id, Some(pid(1)));
    conn.send(clock.at(2), puback(1));
    conn.out(clock.at(2));

    assert!(conn.park_and_unpark());
    assert_eq!(conn.server.version(), Some(V5));
    assert_eq!(conn.server.poll_timeout(), Some(clock.at(17)));
    // Packet identifiers go on where they were.
    conn.deliver_all(clock.at(3), vec![(delivery("t", Q1, "m1"), Enqueued::Sent)]);
    let out = conn.out(clock.at(3));
    assert_eq!(out.publishes()[0].packet_id, Some(pid(2)));
    conn.send(clock.at(4), puback(2));
    conn.out(clock.at(4));

    // The keep alive, the will and the session expiry are as they were.
    assert!(conn.park_and_unpark());
    assert_eq!(advance(&mut conn.server, clock.at(100)), vec![clock.at(19)]);
    let out = conn.out(clock.at(19));
    assert_eq!(out.raw(), vec![vec![0xE0, 1, 0x8D]]);
    let mut session = conn.take_session();
    assert_eq!(session.expiry_interval(), 60);
    let will = will_due(&mut session, clock.at(19)).expect("will published");
    assert_eq!(will.topic, topic("status/c"));
}

#[test]
fn a_connection_with_something_going_on_does_not_park() {
    let mut conn = Conn::open(config(), ConnectBuilder::v5("c").keep_alive(10));
    let clock = conn.clock;
    // A QoS 2 message awaiting PUBREL.
    conn.send(clock.at(1), Packet::Publish(publish("a", Q2, 9, "x")));
    conn.out(clock.at(1));
    assert!(!conn.park_and_unpark(), "unacknowledged by the broker");
    conn.server.publish_ack(pid(9), R::Success).unwrap();
    conn.out(clock.at(1));
    assert!(!conn.park_and_unpark(), "awaiting PUBREL");
    conn.send(clock.at(2), pubrel(9));
    conn.out(clock.at(2));
    assert!(conn.park_and_unpark());

    // A message in flight to the client.
    conn.deliver_all(clock.at(3), vec![(delivery("t", Q1, "m"), Enqueued::Sent)]);
    assert!(!conn.park_and_unpark(), "output not taken");
    conn.out(clock.at(3));
    assert!(!conn.park_and_unpark(), "in flight");
    conn.send(clock.at(4), puback(1));
    conn.out(clock.at(4));
    assert!(conn.park_and_unpark());

    // A topic alias the client set.
    conn.send(
        clock.at(5),
        Packet::Publish(publish_aliased("a/b", 1, Q0, 0, "x")),
    );
    conn.out(clock.at(5));
    assert!(!conn.park_and_unpark(), "a topic alias is set");
    // Still the same connection: the alias resolves.
    conn.send(
        clock.at(6),
        Packet::Publish(publish_aliased("", 1, Q0, 0, "y")),
    );
    let out = conn.out(clock.at(6));
    assert!(matches!(only_event(&out), Event::Publish(p) if p.message.topic == topic("a/b")));
}
