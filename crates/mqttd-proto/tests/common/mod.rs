//! Helpers shared by the tests of the connection state machines: a virtual clock, packet
//! builders, and a driver that takes what a machine wants to send through the real codec, so
//! tests look at the bytes a peer would read.
//!
//! Nothing here is specific to one role. A state machine plugs in by implementing [`Endpoint`].
#![allow(dead_code)]

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use mqttd_proto::codec::{DecodeError, PacketReader};
use mqttd_proto::server::{Event as ServerEvent, ServerConnection};
use mqttd_proto::{
    Auth, AuthProperties, ClientId, Connect, ConnectProperties, Delivery, Disconnect, Message,
    MqttStr, Packet, PacketId, ProtocolVersion, PubResponse, Publish, PublishProperties, QoS,
    ReasonCode, Subscribe, SubscribeProperties, Subscription, SubscriptionOptions, TopicFilter,
    TopicName, Unsubscribe, Will, WillProperties,
};

// ---------------------------------------------------------------------------------------------
// Virtual time
// ---------------------------------------------------------------------------------------------

/// A virtual clock: one real `Instant` taken once, and offsets from it. Nothing ever sleeps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    t0: Instant,
}

impl Clock {
    /// A clock starting now.
    pub(crate) fn new() -> Self {
        Self { t0: Instant::now() }
    }

    /// The start.
    pub(crate) fn t0(&self) -> Instant {
        self.t0
    }

    /// `secs` seconds after the start.
    pub(crate) fn at(&self, secs: u64) -> Instant {
        self.t0 + Duration::from_secs(secs)
    }

    /// `ms` milliseconds after the start.
    pub(crate) fn at_ms(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------

pub(crate) fn topic(s: &str) -> TopicName {
    TopicName::try_from(s).expect("valid topic name")
}

pub(crate) fn filter(s: &str) -> TopicFilter {
    TopicFilter::try_from(s).expect("valid topic filter")
}

pub(crate) fn pid(n: u16) -> PacketId {
    PacketId::new(n).expect("non-zero packet identifier")
}

pub(crate) fn s(text: &str) -> MqttStr {
    MqttStr::try_from(text).expect("valid MQTT string")
}

pub(crate) fn client_id(text: &str) -> ClientId {
    ClientId::try_from(text).expect("valid client identifier")
}

pub(crate) fn bytes(data: &str) -> Bytes {
    Bytes::copy_from_slice(data.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Packet builders
// ---------------------------------------------------------------------------------------------

/// A CONNECT under construction: clean start, keep alive 0, no will, no properties.
#[derive(Debug, Clone)]
pub(crate) struct ConnectBuilder(pub(crate) Connect);

impl ConnectBuilder {
    pub(crate) fn new(version: ProtocolVersion, id: &str) -> Self {
        Self(Connect {
            protocol: version,
            clean_start: true,
            keep_alive: 0,
            client_id: client_id(id),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties::default(),
        })
    }

    pub(crate) fn v5(id: &str) -> Self {
        Self::new(ProtocolVersion::V5, id)
    }

    pub(crate) fn v311(id: &str) -> Self {
        Self::new(ProtocolVersion::V3_1_1, id)
    }

    pub(crate) fn clean_start(mut self, clean: bool) -> Self {
        self.0.clean_start = clean;
        self
    }

    pub(crate) fn keep_alive(mut self, secs: u16) -> Self {
        self.0.keep_alive = secs;
        self
    }

    pub(crate) fn session_expiry(mut self, secs: u32) -> Self {
        self.0.properties.session_expiry_interval = Some(secs);
        self
    }

    pub(crate) fn receive_maximum(mut self, max: u16) -> Self {
        self.0.properties.receive_maximum = Some(NonZeroU16::new(max).expect("non-zero"));
        self
    }

    pub(crate) fn maximum_packet_size(mut self, max: u32) -> Self {
        self.0.properties.maximum_packet_size = Some(NonZeroU32::new(max).expect("non-zero"));
        self
    }

    pub(crate) fn topic_alias_maximum(mut self, max: u16) -> Self {
        self.0.properties.topic_alias_maximum = Some(max);
        self
    }

    pub(crate) fn auth(mut self, method: &str, data: Option<&str>) -> Self {
        self.0.properties.authentication_method = Some(s(method));
        self.0.properties.authentication_data = data.map(bytes);
        self
    }

    pub(crate) fn credentials(mut self, user: &str, password: &str) -> Self {
        self.0.username = Some(s(user));
        self.0.password = Some(bytes(password));
        self
    }

    pub(crate) fn will(mut self, will: Will) -> Self {
        self.0.will = Some(will);
        self
    }

    pub(crate) fn build(self) -> Connect {
        self.0
    }

    pub(crate) fn packet(self) -> Packet {
        Packet::Connect(Box::new(self.0))
    }
}

/// A will with no delay and no properties.
pub(crate) fn will(topic_name: &str, payload: &str, qos: QoS) -> Will {
    Will {
        topic: topic(topic_name),
        payload: bytes(payload),
        qos,
        retain: false,
        properties: WillProperties::default(),
    }
}

/// A will published `delay` seconds after the connection is lost.
pub(crate) fn delayed_will(topic_name: &str, payload: &str, delay: u32) -> Will {
    let mut w = will(topic_name, payload, QoS::AtLeastOnce);
    w.properties.will_delay_interval = Some(delay);
    w
}

/// A PUBLISH; `id` is ignored for QoS 0.
pub(crate) fn publish(topic_name: &str, qos: QoS, id: u16, payload: &str) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: if topic_name.is_empty() {
            TopicName::empty()
        } else {
            topic(topic_name)
        },
        packet_id: (qos != QoS::AtMostOnce).then(|| pid(id)),
        properties: PublishProperties::default(),
        payload: bytes(payload),
    }
}

/// A PUBLISH naming its topic by alias: with the topic when `topic_name` is not empty (setting
/// the alias), with an empty topic otherwise (using it).
pub(crate) fn publish_aliased(
    topic_name: &str,
    alias: u16,
    qos: QoS,
    id: u16,
    payload: &str,
) -> Publish {
    let mut p = publish(topic_name, qos, id, payload);
    p.properties.topic_alias = Some(NonZeroU16::new(alias).expect("non-zero alias"));
    p
}

pub(crate) fn pub_response(id: u16, reason: ReasonCode) -> PubResponse {
    PubResponse {
        reason,
        ..PubResponse::success(pid(id))
    }
}

pub(crate) fn puback(id: u16) -> Packet {
    Packet::PubAck(PubResponse::success(pid(id)))
}

pub(crate) fn pubrec(id: u16) -> Packet {
    Packet::PubRec(PubResponse::success(pid(id)))
}

pub(crate) fn pubrel(id: u16) -> Packet {
    Packet::PubRel(PubResponse::success(pid(id)))
}

pub(crate) fn pubcomp(id: u16) -> Packet {
    Packet::PubComp(PubResponse::success(pid(id)))
}

/// SUBSCRIBE with default options at each QoS.
pub(crate) fn subscribe(id: u16, filters: &[(&str, QoS)]) -> Subscribe {
    Subscribe {
        packet_id: pid(id),
        properties: SubscribeProperties::default(),
        filters: filters
            .iter()
            .map(|(f, qos)| Subscription {
                filter: filter(f),
                options: SubscriptionOptions {
                    qos: *qos,
                    ..SubscriptionOptions::default()
                },
            })
            .collect(),
    }
}

pub(crate) fn unsubscribe(id: u16, filters: &[&str]) -> Unsubscribe {
    Unsubscribe {
        packet_id: pid(id),
        user_properties: Vec::new(),
        filters: filters.iter().map(|f| filter(f)).collect(),
    }
}

pub(crate) fn disconnect(reason: ReasonCode) -> Packet {
    Packet::Disconnect(Disconnect::new(reason))
}

pub(crate) fn auth(reason: ReasonCode, method: Option<&str>, data: Option<&str>) -> Packet {
    Packet::Auth(Auth {
        reason,
        properties: AuthProperties {
            authentication_method: method.map(s),
            authentication_data: data.map(bytes),
            ..AuthProperties::default()
        },
    })
}

/// A message with no properties and no expiry.
pub(crate) fn message(topic_name: &str, qos: QoS, payload: &str) -> Arc<Message> {
    Arc::new(Message::new(topic(topic_name), bytes(payload), qos, false))
}

/// A delivery of a new message at its own QoS.
pub(crate) fn delivery(topic_name: &str, qos: QoS, payload: &str) -> Delivery {
    Delivery::new(message(topic_name, qos, payload))
}

// ---------------------------------------------------------------------------------------------
// The wire
// ---------------------------------------------------------------------------------------------

/// Encodes `packet` for `version`, checking that `encoded_len` was exact.
#[track_caller]
pub(crate) fn encode(version: ProtocolVersion, packet: &Packet) -> Bytes {
    let mut buf = BytesMut::new();
    packet
        .encode(version, &mut buf)
        .unwrap_or_else(|e| panic!("{packet:?} cannot be encoded for {version}: {e}"));
    assert_eq!(buf.len(), packet.encoded_len(version), "{packet:?}");
    buf.freeze()
}

/// Reads one packet out of `wire` as a peer whose maximum packet size is `max_packet_size`
/// would, expecting nothing left over.
pub(crate) fn read_one(
    wire: &[u8],
    version: Option<ProtocolVersion>,
    max_packet_size: u32,
) -> Result<Packet, DecodeError> {
    let mut buf = BytesMut::from(wire);
    let packet = PacketReader::new(max_packet_size).read(&mut buf, version)?;
    let packet = packet.unwrap_or_else(|| panic!("{wire:02X?} is not a whole packet"));
    assert!(buf.is_empty(), "{} bytes left after one packet", buf.len());
    Ok(packet)
}

/// A packet as the peer sees it: encoded for `version`, then decoded by a reader that refuses
/// anything above `max_packet_size`.
#[track_caller]
pub(crate) fn over_the_wire(
    version: ProtocolVersion,
    packet: &Packet,
    max_packet_size: u32,
) -> Packet {
    let wire = encode(version, packet);
    read_one(&wire, Some(version), max_packet_size).unwrap_or_else(|e| {
        panic!(
            "the peer cannot read {packet:?} ({} bytes): {e}",
            wire.len()
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Driving a state machine
// ---------------------------------------------------------------------------------------------

/// What the drivers need from a connection state machine.
pub(crate) trait Endpoint {
    /// What the machine reports to its owner.
    type Event;

    /// The version its packets are encoded with, once known.
    fn wire_version(&self) -> Option<ProtocolVersion>;
    /// The next packet to send.
    fn next_transmit(&mut self, now: Instant) -> Option<Packet>;
    /// The next event.
    fn next_event(&mut self) -> Option<Self::Event>;
    /// When the machine next wants [`Endpoint::on_timeout`].
    fn next_timeout(&self) -> Option<Instant>;
    /// Runs timers due at `now`.
    fn on_timeout(&mut self, now: Instant);
}

impl Endpoint for ServerConnection {
    type Event = ServerEvent;

    fn wire_version(&self) -> Option<ProtocolVersion> {
        self.version()
    }

    fn next_transmit(&mut self, _now: Instant) -> Option<Packet> {
        self.poll_transmit()
    }

    fn next_event(&mut self) -> Option<ServerEvent> {
        self.poll_event()
    }

    fn next_timeout(&self) -> Option<Instant> {
        self.poll_timeout()
    }

    fn on_timeout(&mut self, now: Instant) {
        self.handle_timeout(now);
    }
}

/// Everything a machine produced since it was last drained.
#[derive(Debug)]
pub(crate) struct Drained<E> {
    /// Transmitted packets, as the peer decoded them.
    pub(crate) packets: Vec<Packet>,
    /// The bytes of each packet.
    pub(crate) wire: Vec<Bytes>,
    /// Events, in order.
    pub(crate) events: Vec<E>,
}

impl<E> Drained<E> {
    pub(crate) fn is_empty(&self) -> bool {
        self.packets.is_empty() && self.events.is_empty()
    }
}

/// Takes every pending transmit and event. Each packet is encoded with the machine's version
/// and decoded by a reader limited to the peer's `peer_max_packet_size`, so a packet the peer
/// could not read fails the test.
#[track_caller]
pub(crate) fn drain<M: Endpoint>(
    m: &mut M,
    now: Instant,
    peer_max_packet_size: u32,
) -> Drained<M::Event> {
    let mut out = Drained {
        packets: Vec::new(),
        wire: Vec::new(),
        events: Vec::new(),
    };
    while let Some(packet) = m.next_transmit(now) {
        let version = m
            .wire_version()
            .unwrap_or_else(|| panic!("{packet:?} transmitted before the version is known"));
        let wire = encode(version, &packet);
        let decoded = read_one(&wire, Some(version), peer_max_packet_size).unwrap_or_else(|e| {
            panic!(
                "the peer cannot read {packet:?} ({} bytes): {e}",
                wire.len()
            )
        });
        out.packets.push(decoded);
        out.wire.push(wire);
    }
    while let Some(event) = m.next_event() {
        out.events.push(event);
    }
    out
}

/// Runs every timer due up to and including `until`, in order, as a driver sleeping until each
/// `poll_timeout` would. Returns the instants at which timers ran.
pub(crate) fn advance<M: Endpoint>(m: &mut M, until: Instant) -> Vec<Instant> {
    let mut ran = Vec::new();
    while let Some(due) = m.next_timeout().filter(|due| *due <= until) {
        m.on_timeout(due);
        assert!(
            m.next_timeout() != Some(due),
            "a timer that ran at {due:?} is due again at the same instant"
        );
        ran.push(due);
    }
    ran
}
