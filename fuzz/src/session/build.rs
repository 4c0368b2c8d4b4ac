//! Turns the input's specs into protocol values: packets, messages, configurations.
//!
//! Choices are made from small fixed tables (topics, filters, client identifiers, methods), so
//! that topic aliases, shared filters and identifier clashes come up often.

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqttd_proto::message::MessageProperties;
use mqttd_proto::session::QueueLimits;
use mqttd_proto::{
    AckProperties, Auth, AuthProperties, ClientId, ConnAck, ConnAckProperties, Connect,
    ConnectProperties, Delivery, Message, MqttStr, PacketId, ProtocolVersion, PubResponse, Publish,
    PublishProperties, QoS, ReasonCode, RetainHandling, Subscription, SubscriptionOptions,
    TopicFilter, TopicName, UserProperty, Will, WillProperties, MAX_SUBSCRIPTION_ID,
};

use super::input::{
    AckSpec, AuthSpec, ConnAckSpec, ConnectSpec, FilterSpec, IdRef, MessageSpec, PublishSpec,
    QueueSpec, TimeStep, WillSpec,
};

/// Most operations run per input.
pub const MAX_OPS: usize = 64;
/// Most raw bytes fed per operation.
pub const MAX_RAW: usize = 512;
/// Most filters or reason codes per SUBSCRIBE, UNSUBSCRIBE or their answers.
pub const MAX_LIST: usize = 6;
/// Most stored sessions.
pub const MAX_STORED: usize = 4;
/// How many recent packet identifiers a list keeps for `IdRef::Recent`.
pub const MAX_RECENT: usize = 16;

/// Topics messages are published to.
pub const TOPICS: [&str; 4] = ["a", "a/b", "sensors/room-1/temperature", "$SYS/load"];
/// Topic filters.
pub const FILTERS: [&str; 6] = ["#", "a/+", "a", "$share/g/a/#", "+/+/temperature", "$SYS/#"];
/// Client identifiers; the empty one asks the server to assign one.
pub const CLIENT_IDS: [&str; 3] = ["client", "", "other"];
/// Enhanced authentication methods; index 0 is none.
pub const METHODS: [Option<&str>; 3] = [None, Some("SCRAM-SHA-256"), Some("PLAIN")];

/// Every reason code, in ascending order: `REASONS[0]` is success.
pub fn reasons() -> &'static [ReasonCode] {
    static REASONS: OnceLock<Vec<ReasonCode>> = OnceLock::new();
    REASONS.get_or_init(|| (0..=u8::MAX).filter_map(ReasonCode::from_u8).collect())
}

/// The reason code a byte of the input picks.
pub fn reason(x: u8) -> ReasonCode {
    let all = reasons();
    all[usize::from(x) % all.len()]
}

/// The byte that picks `code`, for writing seeds.
pub fn reason_byte(code: ReasonCode) -> u8 {
    let index = reasons().iter().position(|r| *r == code).unwrap_or(0);
    u8::try_from(index).unwrap_or(0)
}

/// 0 → 5.0, 1 → 3.1.1, 2 → 3.1.
pub fn version(x: u8) -> ProtocolVersion {
    match x % 3 {
        0 => ProtocolVersion::V5,
        1 => ProtocolVersion::V3_1_1,
        _ => ProtocolVersion::V3_1,
    }
}

/// Modulo 3.
pub fn qos(x: u8) -> QoS {
    QoS::from_bits(x % 3).unwrap_or_default()
}

/// An identifier from `recent` (most recent last), or a literal one.
pub fn packet_id(id: &IdRef, recent: &[PacketId]) -> PacketId {
    match *id {
        IdRef::Recent { index } if !recent.is_empty() => {
            recent[recent.len() - 1 - usize::from(index) % recent.len()]
        }
        IdRef::Recent { .. } => PacketId::MIN,
        IdRef::Raw { id } => PacketId::new(id).unwrap_or(PacketId::MIN),
    }
}

/// Remembers `id` as the most recent of `list`, which keeps at most [`MAX_RECENT`].
pub fn remember(list: &mut Vec<PacketId>, id: PacketId) {
    list.retain(|i| *i != id);
    list.push(id);
    if list.len() > MAX_RECENT {
        list.remove(0);
    }
}

pub fn duration(step: &TimeStep) -> Duration {
    let amount = u64::from(step.amount);
    match step.unit % 4 {
        0 => Duration::from_millis(amount),
        1 => Duration::from_secs(amount),
        2 => Duration::from_secs(amount * 1000),
        _ => Duration::from_secs(amount << 20),
    }
}

pub fn queue_limits(q: &QueueSpec) -> QueueLimits {
    QueueLimits {
        max_messages: if q.max_messages == 0 {
            QueueLimits::default().max_messages
        } else {
            usize::from(q.max_messages % 16)
        },
        max_bytes: usize::from(q.max_bytes),
    }
}

fn s(text: &str) -> MqttStr {
    MqttStr::try_from(text).unwrap_or_default()
}

pub fn topic(x: u8) -> TopicName {
    TopicName::try_from(TOPICS[usize::from(x) % TOPICS.len()])
        .unwrap_or_else(|_| TopicName::empty())
}

pub fn filter(x: u8) -> TopicFilter {
    let text = FILTERS[usize::from(x) % FILTERS.len()];
    TopicFilter::try_from(text).unwrap_or_else(|e| panic!("filter {text}: {e}"))
}

pub fn client_id(x: u8) -> ClientId {
    ClientId::try_from(CLIENT_IDS[usize::from(x) % CLIENT_IDS.len()]).unwrap_or_default()
}

pub fn method(x: u8) -> Option<MqttStr> {
    METHODS[usize::from(x) % METHODS.len()].map(s)
}

pub fn data(x: Option<u8>) -> Option<Bytes> {
    x.map(|len| Bytes::from(vec![b'd'; usize::from(len % 32)]))
}

fn user_properties(count: u8) -> Vec<UserProperty> {
    (0..count % 3)
        .map(|i| (s("k"), s(&i.to_string())))
        .collect()
}

fn payload(units: u8, byte: u8) -> Bytes {
    Bytes::from(vec![byte; usize::from(units) * 4])
}

fn message_properties(bits: u8) -> MessageProperties {
    MessageProperties {
        user_properties: user_properties(bits & 1),
        response_topic: (bits & 2 != 0).then(|| topic(1)),
        correlation_data: (bits & 4 != 0).then(|| Bytes::from_static(b"corr")),
        content_type: (bits & 8 != 0).then(|| s("text/plain")),
        payload_format_indicator: (bits & 16 != 0).then_some(true),
    }
}

/// An application message created at `now`.
pub fn message(spec: &MessageSpec, now: Instant) -> Message {
    Message {
        topic: topic(spec.topic),
        payload: payload(spec.payload, b'p'),
        qos: qos(spec.qos),
        retain: spec.retain,
        properties: message_properties(spec.properties),
        expires_at: spec
            .expiry
            .map(|secs| now + Duration::from_secs(secs.into())),
    }
}

/// A message on its way to a subscriber.
pub fn delivery(spec: &MessageSpec, subscription_ids: &[u32], now: Instant) -> Delivery {
    let mut delivery = Delivery::new(Arc::new(message(spec, now)));
    delivery.subscription_ids = subscription_ids
        .iter()
        .take(3)
        .filter_map(|id| NonZeroU32::new(1 + id % MAX_SUBSCRIPTION_ID))
        .collect();
    delivery
}

pub fn will(spec: &WillSpec) -> Will {
    Will {
        topic: topic(spec.topic),
        payload: payload(spec.payload, b'w'),
        qos: qos(spec.qos),
        retain: spec.retain,
        properties: WillProperties {
            will_delay_interval: spec.delay,
            message_expiry_interval: spec.expiry,
            ..WillProperties::default()
        },
    }
}

pub fn connect(spec: &ConnectSpec) -> Connect {
    Connect {
        protocol: version(spec.version),
        clean_start: !spec.resume,
        keep_alive: spec.keep_alive,
        client_id: client_id(spec.client_id),
        will: spec.will.as_ref().map(will),
        username: spec.username.then(|| s("user")),
        password: spec.password.then(|| Bytes::from_static(b"pass")),
        properties: ConnectProperties {
            session_expiry_interval: spec.session_expiry,
            receive_maximum: NonZeroU16::new(spec.receive_maximum),
            maximum_packet_size: NonZeroU32::new(spec.maximum_packet_size),
            topic_alias_maximum: spec.topic_alias_maximum,
            request_response_information: spec.request_response_information.then_some(true),
            request_problem_information: None,
            user_properties: user_properties(spec.user_properties),
            authentication_method: method(spec.auth_method),
            authentication_data: data(spec.auth_data),
            bridge: false,
        },
    }
}

/// A PUBLISH as a peer sends it: the topic is left out when the topic choice has its high bit
/// set, so that only the alias names it.
pub fn publish(spec: &PublishSpec, packet_id: Option<PacketId>) -> Publish {
    let m = &spec.message;
    let p = message_properties(m.properties);
    Publish {
        dup: spec.dup,
        qos: qos(m.qos),
        retain: m.retain,
        topic: if m.topic & 0x80 != 0 {
            TopicName::empty()
        } else {
            topic(m.topic)
        },
        packet_id,
        properties: PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: m.expiry,
            topic_alias: NonZeroU16::new(spec.alias),
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user_properties,
            subscription_identifiers: NonZeroU32::new(spec.subscription_id % MAX_SUBSCRIPTION_ID)
                .into_iter()
                .collect(),
            content_type: p.content_type,
        },
        payload: payload(m.payload, b'q'),
    }
}

pub fn ack(spec: &AckSpec, packet_id: PacketId) -> PubResponse {
    PubResponse {
        packet_id,
        reason: reason(spec.reason),
        properties: AckProperties {
            reason_string: spec.reason_string.then(|| s("why")),
            user_properties: Vec::new(),
        },
    }
}

pub fn auth(spec: &AuthSpec) -> Auth {
    Auth {
        reason: reason(spec.reason),
        properties: AuthProperties {
            authentication_method: method(spec.method),
            authentication_data: data(spec.data),
            ..AuthProperties::default()
        },
    }
}

pub fn connack(spec: &ConnAckSpec) -> ConnAck {
    ConnAck {
        session_present: spec.session_present,
        reason: reason(spec.reason),
        properties: ConnAckProperties {
            session_expiry_interval: spec.session_expiry,
            receive_maximum: NonZeroU16::new(spec.receive_maximum),
            maximum_qos: match spec.maximum_qos {
                1 => Some(QoS::AtMostOnce),
                2 => Some(QoS::AtLeastOnce),
                _ => None,
            },
            retain_available: match spec.retain_available {
                0 => None,
                1 => Some(false),
                _ => Some(true),
            },
            maximum_packet_size: NonZeroU32::new(spec.maximum_packet_size),
            assigned_client_identifier: spec
                .assigned_client_id
                .then(|| ClientId::try_from("assigned").unwrap_or_default()),
            topic_alias_maximum: (spec.topic_alias_maximum > 0).then_some(spec.topic_alias_maximum),
            server_keep_alive: spec.server_keep_alive,
            authentication_method: method(spec.auth_method),
            authentication_data: data(spec.auth_data),
            user_properties: user_properties(spec.user_properties),
            ..ConnAckProperties::default()
        },
    }
}

pub fn subscription(spec: &FilterSpec) -> Subscription {
    Subscription {
        filter: filter(spec.filter),
        options: SubscriptionOptions {
            qos: qos(spec.qos),
            no_local: spec.no_local,
            retain_as_published: spec.retain_as_published,
            retain_handling: match spec.retain_handling % 3 {
                0 => RetainHandling::SendAtSubscribe,
                1 => RetainHandling::SendIfNew,
                _ => RetainHandling::DoNotSend,
            },
        },
    }
}

pub fn subscriptions(specs: &[FilterSpec]) -> Vec<Subscription> {
    specs.iter().take(MAX_LIST).map(subscription).collect()
}

pub fn filters(specs: &[u8]) -> Vec<TopicFilter> {
    specs.iter().take(MAX_LIST).map(|x| filter(*x)).collect()
}

pub fn reason_list(specs: &[u8]) -> Vec<ReasonCode> {
    specs.iter().take(MAX_LIST).map(|x| reason(*x)).collect()
}
