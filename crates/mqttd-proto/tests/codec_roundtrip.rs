//! Property tests for the codec: every packet of every protocol version survives an encode and a
//! decode through [`PacketReader`], `encoded_len` is exact, and no input makes the reader panic.
//!
//! The generators only produce what a version can carry: fields that an older version has no
//! room for (properties, most reason codes, subscription options, topic aliases) take their
//! defaults there, because the encoder drops them and the decoder could not give them back.

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{BufMut, Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::FileFailurePersistence;

use mqttd_proto::codec::{DecodeError, PacketReader};
use mqttd_proto::{
    AckProperties, Auth, AuthProperties, ConnAck, ConnAckProperties, Connect, ConnectProperties,
    Disconnect, DisconnectProperties, MqttStr, Packet, PacketId, ProtocolVersion, PubResponse,
    Publish, PublishProperties, QoS, ReasonCode, ReasonContext, RetainHandling, SubAck, Subscribe,
    SubscribeProperties, Subscription, SubscriptionOptions, TopicFilter, TopicName, UnsubAck,
    Unsubscribe, UserProperty, Will, WillProperties, MAX_REMAINING_LENGTH, MAX_SUBSCRIPTION_ID,
};

const VERSIONS: [ProtocolVersion; 3] = [
    ProtocolVersion::V3_1,
    ProtocolVersion::V3_1_1,
    ProtocolVersion::V5,
];

/// Large enough for every generated packet, small enough that a declared length the reader
/// reserves up front stays cheap.
const MAX_PACKET_SIZE: u32 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

fn version() -> impl Strategy<Value = ProtocolVersion> {
    select(VERSIONS.to_vec())
}

/// Any MQTT string: every character but U+0000, multi-byte ones included.
fn string() -> impl Strategy<Value = MqttStr> {
    "[^\\x00]{0,10}".prop_map(|s| MqttStr::try_from(s).unwrap())
}

fn binary(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn level() -> impl Strategy<Value = String> {
    "[^\\x00+#/]{0,5}"
}

fn topic_name() -> impl Strategy<Value = TopicName> {
    vec(level(), 1..4)
        .prop_map(|levels| levels.join("/"))
        .prop_filter("a topic name is never empty", |s| !s.is_empty())
        .prop_map(|s| TopicName::try_from(s).unwrap())
}

fn topic_filter() -> impl Strategy<Value = TopicFilter> {
    let level = prop_oneof![3 => level(), 1 => Just("+".to_owned())];
    let share = option::weighted(0.2, "[^\\x00+#/]{1,5}");
    (share, vec(level, 1..4), any::<bool>()).prop_filter_map(
        "wildcards occupy whole levels",
        |(share, mut levels, multi)| {
            if multi {
                levels.push("#".to_owned());
            }
            let mut filter = levels.join("/");
            if let Some(group) = share {
                filter = format!("$share/{group}/{filter}");
            }
            TopicFilter::try_from(filter).ok()
        },
    )
}

fn user_properties() -> impl Strategy<Value = Vec<UserProperty>> {
    vec((string(), string()), 0..3)
}

fn qos() -> impl Strategy<Value = QoS> {
    select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
}

fn packet_id() -> impl Strategy<Value = PacketId> {
    (1..=u16::MAX).prop_map(|v| PacketId::new(v).unwrap())
}

fn nonzero_u16() -> impl Strategy<Value = NonZeroU16> {
    (1..=u16::MAX).prop_map(|v| NonZeroU16::new(v).unwrap())
}

fn nonzero_u32() -> impl Strategy<Value = NonZeroU32> {
    (1..=u32::MAX).prop_map(|v| NonZeroU32::new(v).unwrap())
}

fn subscription_id() -> impl Strategy<Value = NonZeroU32> {
    (1..=MAX_SUBSCRIPTION_ID).prop_map(|v| NonZeroU32::new(v).unwrap())
}

/// The reason codes MQTT 5 allows in `context`.
fn reason(context: ReasonContext) -> impl Strategy<Value = ReasonCode> {
    let codes = (0..=u8::MAX)
        .filter_map(ReasonCode::from_u8)
        .filter(|r| r.valid_for(context))
        .collect::<Vec<_>>();
    select(codes)
}

/// `strategy` in MQTT 5, the default in older versions, which have no room for the value.
fn v5_only<T>(
    version: ProtocolVersion,
    strategy: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<T>
where
    T: Default + Clone + std::fmt::Debug + 'static,
{
    if version.is_v5() {
        strategy.boxed()
    } else {
        Just(T::default()).boxed()
    }
}

fn ack_properties() -> impl Strategy<Value = AckProperties> {
    (option::of(string()), user_properties()).prop_map(|(reason_string, user_properties)| {
        AckProperties {
            reason_string,
            user_properties,
        }
    })
}

fn connect_properties() -> impl Strategy<Value = ConnectProperties> {
    (
        option::of(any::<u32>()),
        option::of(nonzero_u16()),
        option::of(nonzero_u32()),
        option::of(any::<u16>()),
        option::of(any::<bool>()),
        option::of(any::<bool>()),
        user_properties(),
        option::of(string()),
        option::of(binary(16)),
    )
        .prop_map(
            |(sei, rm, mps, tam, rri, rpi, users, method, data)| ConnectProperties {
                session_expiry_interval: sei,
                receive_maximum: rm,
                maximum_packet_size: mps,
                topic_alias_maximum: tam,
                request_response_information: rri,
                request_problem_information: rpi,
                user_properties: users,
                authentication_method: method,
                authentication_data: data,
                bridge: false,
            },
        )
}

fn will_properties() -> impl Strategy<Value = WillProperties> {
    (
        option::of(any::<u32>()),
        option::of(any::<bool>()),
        option::of(any::<u32>()),
        option::of(string()),
        option::of(topic_name()),
        option::of(binary(16)),
        user_properties(),
    )
        .prop_map(
            |(delay, pfi, expiry, content_type, rt, cd, users)| WillProperties {
                will_delay_interval: delay,
                payload_format_indicator: pfi,
                message_expiry_interval: expiry,
                content_type,
                response_topic: rt,
                correlation_data: cd,
                user_properties: users,
            },
        )
}

fn will(version: ProtocolVersion) -> impl Strategy<Value = Will> {
    (
        topic_name(),
        binary(32),
        qos(),
        any::<bool>(),
        v5_only(version, will_properties()),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| Will {
            topic,
            payload,
            qos,
            retain,
            properties,
        })
}

fn connect(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (
        any::<bool>(),
        any::<u16>(),
        string(),
        option::of(will(version)),
        option::of(string()),
        option::of(binary(16)),
        v5_only(version, connect_properties()),
        any::<bool>(),
    )
        .prop_map(
            move |(
                clean_start,
                keep_alive,
                client_id,
                will,
                username,
                mut password,
                mut properties,
                bridge,
            )| {
                // Before MQTT 5 a password needs a user name [MQTT-3.1.2-22].
                if !version.is_v5() && username.is_none() {
                    password = None;
                }
                // Mosquitto's bridge flag exists only before MQTT 5.
                properties.bridge = bridge && !version.is_v5();
                Packet::Connect(Box::new(Connect {
                    protocol: version,
                    clean_start,
                    keep_alive,
                    client_id: client_id.as_str().try_into().unwrap(),
                    will,
                    username,
                    password,
                    properties,
                }))
            },
        )
}

fn connack_properties() -> impl Strategy<Value = ConnAckProperties> {
    let first = (
        option::of(any::<u32>()),
        option::of(nonzero_u16()),
        // Maximum QoS is 0 or 1; 2 is expressed by leaving the property out.
        option::of(select(vec![QoS::AtMostOnce, QoS::AtLeastOnce])),
        option::of(any::<bool>()),
        option::of(nonzero_u32()),
        option::of(string()),
        option::of(any::<u16>()),
        option::of(string()),
    );
    let second = (
        user_properties(),
        option::of(any::<bool>()),
        option::of(any::<bool>()),
        option::of(any::<bool>()),
        option::of(any::<u16>()),
        option::of(string()),
        option::of(string()),
        option::of(string()),
        option::of(binary(16)),
    );
    (first, second).prop_map(
        |((sei, rm, mq, ra, mps, aci, tam, rs), (users, wsa, sia, ssa, ska, ri, sr, am, ad))| {
            ConnAckProperties {
                session_expiry_interval: sei,
                receive_maximum: rm,
                maximum_qos: mq,
                retain_available: ra,
                maximum_packet_size: mps,
                assigned_client_identifier: aci.map(|s| s.as_str().try_into().unwrap()),
                topic_alias_maximum: tam,
                reason_string: rs,
                user_properties: users,
                wildcard_subscription_available: wsa,
                subscription_identifiers_available: sia,
                shared_subscription_available: ssa,
                server_keep_alive: ska,
                response_information: ri,
                server_reference: sr,
                authentication_method: am,
                authentication_data: ad,
            }
        },
    )
}

fn connack(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let reason = if version.is_v5() {
        reason(ReasonContext::ConnAck).boxed()
    } else {
        // The six return codes of MQTT 3.1 and 3.1.1.
        select(vec![
            ReasonCode::Success,
            ReasonCode::UnsupportedProtocolVersion,
            ReasonCode::ClientIdentifierNotValid,
            ReasonCode::ServerUnavailable,
            ReasonCode::BadUserNameOrPassword,
            ReasonCode::NotAuthorized,
        ])
        .boxed()
    };
    (
        any::<bool>(),
        reason,
        v5_only(version, connack_properties()),
    )
        .prop_map(move |(session_present, reason, properties)| {
            Packet::ConnAck(ConnAck {
                // MQTT 3.1 has no session present flag, and a refusal never has a session
                // [MQTT-3.2.2-6].
                session_present: session_present
                    && version != ProtocolVersion::V3_1
                    && reason == ReasonCode::Success,
                reason,
                properties,
            })
        })
}

fn publish_properties() -> impl Strategy<Value = PublishProperties> {
    (
        option::of(any::<bool>()),
        option::of(any::<u32>()),
        option::of(nonzero_u16()),
        option::of(topic_name()),
        option::of(binary(16)),
        user_properties(),
        vec(subscription_id(), 0..3),
        option::of(string()),
    )
        .prop_map(
            |(pfi, expiry, alias, rt, cd, users, ids, ct)| PublishProperties {
                payload_format_indicator: pfi,
                message_expiry_interval: expiry,
                topic_alias: alias,
                response_topic: rt,
                correlation_data: cd,
                user_properties: users,
                subscription_identifiers: ids,
                content_type: ct,
            },
        )
}

fn publish(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    // Only MQTT 5 can leave the topic empty, naming it by alias instead.
    let topic = if version.is_v5() {
        option::weighted(0.8, topic_name()).boxed()
    } else {
        topic_name().prop_map(Some).boxed()
    };
    (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic,
        packet_id(),
        v5_only(version, publish_properties()),
        nonzero_u16(),
        binary(64),
    )
        .prop_map(
            |(dup, qos, retain, topic, id, mut properties, alias, payload)| {
                let topic = topic.unwrap_or_else(|| {
                    properties.topic_alias.get_or_insert(alias);
                    TopicName::empty()
                });
                let acknowledged = qos != QoS::AtMostOnce;
                Packet::Publish(Publish {
                    dup: dup && acknowledged,
                    qos,
                    retain,
                    topic,
                    packet_id: acknowledged.then_some(id),
                    properties,
                    payload,
                })
            },
        )
}

fn pub_response(version: ProtocolVersion, context: ReasonContext) -> BoxedStrategy<PubResponse> {
    if !version.is_v5() {
        return packet_id().prop_map(PubResponse::success).boxed();
    }
    (packet_id(), reason(context), ack_properties())
        .prop_map(|(packet_id, reason, properties)| PubResponse {
            packet_id,
            reason,
            properties,
        })
        .boxed()
}

fn subscription(version: ProtocolVersion) -> impl Strategy<Value = Subscription> {
    let retain_handling = select(vec![
        RetainHandling::SendAtSubscribe,
        RetainHandling::SendIfNew,
        RetainHandling::DoNotSend,
    ]);
    let v5_options = (any::<bool>(), any::<bool>(), retain_handling);
    (
        topic_filter(),
        qos(),
        v5_only(version, v5_options.prop_map(Some)),
    )
        .prop_map(|(filter, qos, v5)| {
            let (no_local, retain_as_published, retain_handling) = v5.unwrap_or_default();
            Subscription {
                filter,
                options: SubscriptionOptions {
                    qos,
                    no_local,
                    retain_as_published,
                    retain_handling,
                },
            }
        })
}

fn subscribe(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let properties = (option::of(subscription_id()), user_properties()).prop_map(
        |(subscription_identifier, user_properties)| SubscribeProperties {
            subscription_identifier,
            user_properties,
        },
    );
    (
        packet_id(),
        v5_only(version, properties),
        vec(subscription(version), 1..4),
    )
        .prop_map(|(packet_id, properties, filters)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                properties,
                filters,
            })
        })
}

fn suback(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let reason = if version.is_v5() {
        reason(ReasonContext::SubAck).boxed()
    } else {
        // Every failure is 0x80 before MQTT 5.
        select(vec![
            ReasonCode::Success,
            ReasonCode::GrantedQoS1,
            ReasonCode::GrantedQoS2,
            ReasonCode::UnspecifiedError,
        ])
        .boxed()
    };
    (
        packet_id(),
        v5_only(version, ack_properties()),
        vec(reason, 1..4),
    )
        .prop_map(|(packet_id, properties, reasons)| {
            Packet::SubAck(SubAck {
                packet_id,
                properties,
                reasons,
            })
        })
}

fn unsubscribe(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (
        packet_id(),
        v5_only(version, user_properties()),
        vec(topic_filter(), 1..4),
    )
        .prop_map(|(packet_id, user_properties, filters)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                user_properties,
                filters,
            })
        })
}

fn unsuback(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    // MQTT 3.1.1 UNSUBACK has no payload.
    let reasons = v5_only(version, vec(reason(ReasonContext::UnsubAck), 1..4));
    (packet_id(), v5_only(version, ack_properties()), reasons).prop_map(
        |(packet_id, properties, reasons)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                properties,
                reasons,
            })
        },
    )
}

fn disconnect(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    if !version.is_v5() {
        return Just(Packet::Disconnect(Disconnect::new(ReasonCode::Success))).boxed();
    }
    let properties = (
        option::of(any::<u32>()),
        option::of(string()),
        user_properties(),
        option::of(string()),
    )
        .prop_map(|(sei, rs, users, sr)| DisconnectProperties {
            session_expiry_interval: sei,
            reason_string: rs,
            user_properties: users,
            server_reference: sr,
        });
    (reason(ReasonContext::Disconnect), properties)
        .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties }))
        .boxed()
}

fn auth() -> impl Strategy<Value = Packet> {
    let properties = (
        option::of(string()),
        option::of(binary(16)),
        option::of(string()),
        user_properties(),
    )
        .prop_map(|(method, data, rs, users)| AuthProperties {
            authentication_method: method,
            authentication_data: data,
            reason_string: rs,
            user_properties: users,
        });
    (reason(ReasonContext::Auth), properties)
        .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties }))
}

/// Any packet that `version` can carry.
fn packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let mut choices = vec![
        connect(version).boxed(),
        connack(version).boxed(),
        publish(version).boxed(),
        pub_response(version, ReasonContext::PubAckRec)
            .prop_map(Packet::PubAck)
            .boxed(),
        pub_response(version, ReasonContext::PubAckRec)
            .prop_map(Packet::PubRec)
            .boxed(),
        pub_response(version, ReasonContext::PubRelComp)
            .prop_map(Packet::PubRel)
            .boxed(),
        pub_response(version, ReasonContext::PubRelComp)
            .prop_map(Packet::PubComp)
            .boxed(),
        subscribe(version).boxed(),
        suback(version).boxed(),
        unsubscribe(version).boxed(),
        unsuback(version).boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect(version),
    ];
    if version.is_v5() {
        choices.push(auth().boxed());
    }
    proptest::strategy::Union::new(choices).boxed()
}

fn versioned_packet() -> impl Strategy<Value = (ProtocolVersion, Packet)> {
    version().prop_flat_map(|v| (Just(v), packet(v)))
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn encode(version: ProtocolVersion, packet: &Packet) -> BytesMut {
    let mut buf = BytesMut::new();
    packet.encode(version, &mut buf).unwrap();
    buf
}

/// The version `PacketReader::read` is told: none until CONNECT has been read.
fn reader_version(version: ProtocolVersion, packet: &Packet) -> Option<ProtocolVersion> {
    match packet {
        Packet::Connect(_) => None,
        _ => Some(version),
    }
}

fn put_varint(buf: &mut Vec<u8>, mut value: u32) {
    loop {
        let byte = (value & 0x7F) as u8;
        value >>= 7;
        if value == 0 {
            buf.put_u8(byte);
            return;
        }
        buf.put_u8(byte | 0x80);
    }
}

/// A packet the decoder accepted must encode again and decode to itself: the decoder never
/// yields a value that the encoder cannot express. `version` is what the reader was told.
fn assert_reencodes(version: Option<ProtocolVersion>, packet: &Packet) {
    let version = match packet {
        Packet::Connect(c) => c.protocol,
        _ => version.expect("only CONNECT is read before the version is known"),
    };
    let mut buf = encode(version, packet);
    assert_eq!(buf.len(), packet.encoded_len(version));
    let again = PacketReader::new(u32::MAX)
        .read(&mut buf, reader_version(version, packet))
        .unwrap_or_else(|e| panic!("re-encoded {packet:?} does not decode: {e}"));
    assert_eq!(again.as_ref(), Some(packet));
    assert!(buf.is_empty());
}

/// Reads packets off `bytes` until the reader wants more or fails, checking every packet it
/// returns. Must never panic.
fn read_all(bytes: &[u8], mut version: Option<ProtocolVersion>, max_packet_size: u32) {
    let mut reader = PacketReader::new(max_packet_size);
    let mut buf = BytesMut::from(bytes);
    loop {
        let before = buf.len();
        match reader.read(&mut buf, version) {
            Ok(Some(packet)) => {
                assert!(buf.len() < before, "a packet consumes bytes");
                assert_reencodes(version, &packet);
                if let Packet::Connect(c) = &packet {
                    version.get_or_insert(c.protocol);
                }
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "an incomplete packet is left in place");
                return;
            }
            Err(e) => {
                // Every error maps to a reason code; this must not panic either.
                let _ = (e.reason_code(), e.connect_version(), e.to_string());
                return;
            }
        }
    }
}

fn read_all_versions(bytes: &[u8], max_packet_size: u32) {
    read_all(bytes, None, max_packet_size);
    for v in VERSIONS {
        read_all(bytes, Some(v), max_packet_size);
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0..8u8).prop_map(|(i, bit)| Mutation::Flip(i, bit)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        let len = bytes.len();
        match *m {
            Mutation::Flip(i, bit) if len > 0 => bytes[i % len] ^= 1 << bit,
            Mutation::Set(i, b) if len > 0 => bytes[i % len] = b,
            Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
            Mutation::Remove(i) if len > 0 => {
                bytes.remove(i % len);
            }
            Mutation::Truncate(i) => bytes.truncate(i % (len + 1)),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig {
        // Integration tests have no lib.rs to anchor the default location.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn encode_then_read_gives_the_same_packet((version, packet) in versioned_packet()) {
        let mut buf = encode(version, &packet);
        prop_assert_eq!(buf.len(), packet.encoded_len(version));
        let decoded = PacketReader::new(MAX_PACKET_SIZE)
            .read(&mut buf, reader_version(version, &packet))
            .unwrap();
        prop_assert_eq!(decoded, Some(packet));
        prop_assert!(buf.is_empty());
    }

    /// Once the session is up the negotiated version is passed; a CONNECT decodes the same
    /// with it as without it.
    #[test]
    fn connect_decodes_the_same_under_any_negotiated_version(
        (version, packet) in version().prop_flat_map(|v| (Just(v), connect(v))),
        negotiated in version(),
    ) {
        let mut buf = encode(version, &packet);
        let decoded = PacketReader::new(MAX_PACKET_SIZE).read(&mut buf, Some(negotiated)).unwrap();
        prop_assert_eq!(decoded, Some(packet));
    }

    /// A connection's whole byte stream, CONNECT first, cut into arbitrary chunks: the reader
    /// waits for each packet to be complete and gives back every packet in order.
    #[test]
    fn streams_survive_any_chunking(
        (version, connect, packets) in version().prop_flat_map(|v| {
            (Just(v), connect(v), vec(packet(v), 0..6))
        }),
        cuts in vec(any::<usize>(), 0..12),
    ) {
        let mut stream = encode(version, &connect).to_vec();
        for p in &packets {
            stream.extend_from_slice(&encode(version, p));
        }
        let mut cuts = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect::<Vec<_>>();
        cuts.push(stream.len());
        cuts.sort_unstable();

        let mut reader = PacketReader::new(MAX_PACKET_SIZE);
        let mut buf = BytesMut::new();
        let mut negotiated = None;
        let mut decoded = Vec::new();
        let mut fed = 0;
        for cut in cuts {
            buf.extend_from_slice(&stream[fed..cut]);
            fed = cut;
            while let Some(packet) = reader.read(&mut buf, negotiated).unwrap() {
                negotiated = Some(version);
                decoded.push(packet);
            }
        }
        prop_assert!(buf.is_empty());
        let expected = std::iter::once(connect).chain(packets).collect::<Vec<_>>();
        prop_assert_eq!(decoded, expected);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in vec(any::<u8>(), 0..256),
        max_packet_size in select(vec![2, 64, 4096, MAX_PACKET_SIZE]),
    ) {
        read_all_versions(&bytes, max_packet_size);
    }

    /// Bytes that get past framing, so the body decoders see them.
    #[test]
    fn arbitrary_body_after_a_valid_fixed_header_never_panics(
        first_byte in 0x10..=u8::MAX,
        body in vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = vec![first_byte];
        put_varint(&mut bytes, body.len() as u32);
        bytes.extend_from_slice(&body);
        read_all_versions(&bytes, MAX_PACKET_SIZE);
    }

    /// Valid encodings damaged a little: as raw bytes, and with the fixed header recomputed so
    /// the damage reaches the body decoders.
    #[test]
    fn mutated_encodings_never_panic(
        (version, packet) in versioned_packet(),
        mutations in vec(mutation(), 1..4),
    ) {
        let encoded = encode(version, &packet);
        let mut raw = encoded.to_vec();
        mutate(&mut raw, &mutations);
        read_all_versions(&raw, MAX_PACKET_SIZE);

        let mut body = encoded[encoded.len() - body_len(&encoded)..].to_vec();
        mutate(&mut body, &mutations);
        let mut reframed = vec![encoded[0]];
        put_varint(&mut reframed, body.len() as u32);
        reframed.extend_from_slice(&body);
        read_all_versions(&reframed, MAX_PACKET_SIZE);
    }

    /// The reader refuses an oversized packet from its fixed header alone, before any of the
    /// body has arrived, whatever the version (even before CONNECT).
    #[test]
    fn declared_length_above_the_limit_is_refused_from_the_header(
        (header, size, max) in oversized_header(),
    ) {
        for v in [None, Some(ProtocolVersion::V3_1), Some(ProtocolVersion::V3_1_1), Some(ProtocolVersion::V5)] {
            let mut buf = BytesMut::from(&header[..]);
            let mut reader = PacketReader::new(max);
            prop_assert_eq!(
                reader.missing(&buf),
                Err(DecodeError::PacketTooLarge { size, max })
            );
            prop_assert_eq!(
                reader.read(&mut buf, v),
                Err(DecodeError::PacketTooLarge { size, max })
            );
        }
    }
}

/// A fixed header declaring more than `max` bytes in all: the header, the packet size it
/// declares and the limit.
fn oversized_header() -> impl Strategy<Value = (Vec<u8>, u64, u32)> {
    (0x10..=u8::MAX, 1..=MAX_REMAINING_LENGTH).prop_flat_map(|(first_byte, remaining)| {
        let mut header = vec![first_byte];
        put_varint(&mut header, remaining);
        let size = header.len() as u64 + u64::from(remaining);
        // At least 2: no packet is smaller than its two-byte fixed header.
        let max = 2..u32::try_from(size).unwrap();
        (Just(header), Just(size), max)
    })
}

/// The length of the body of a single encoded packet (everything after the fixed header).
fn body_len(encoded: &[u8]) -> usize {
    let (len, _) = mqttd_proto::codec::decode_varint(&encoded[1..])
        .unwrap()
        .unwrap();
    len as usize
}

#[test]
fn oversized_header_is_refused_after_five_bytes() {
    // PUBLISH declaring the largest remaining length: 268,435,455 + 5 bytes.
    let header = [0x30, 0xFF, 0xFF, 0xFF, 0x7F];
    for v in [
        None,
        Some(ProtocolVersion::V3_1_1),
        Some(ProtocolVersion::V5),
    ] {
        let mut buf = BytesMut::from(&header[..]);
        let err = PacketReader::new(MAX_PACKET_SIZE)
            .read(&mut buf, v)
            .unwrap_err();
        assert_eq!(
            err,
            DecodeError::PacketTooLarge {
                size: 268_435_460,
                max: MAX_PACKET_SIZE
            }
        );
        assert_eq!(err.reason_code(), ReasonCode::PacketTooLarge);
    }
}

/// Packets exactly at the limit pass, one byte over is refused.
#[test]
fn the_limit_includes_the_fixed_header() {
    let packet = Packet::PubAck(PubResponse::success(PacketId::MIN));
    let encoded = encode(ProtocolVersion::V3_1_1, &packet);
    assert_eq!(encoded.len(), 4);
    let mut buf = encoded.clone();
    let read = PacketReader::new(4).read(&mut buf, Some(ProtocolVersion::V3_1_1));
    assert_eq!(read, Ok(Some(packet)));
    let mut buf = encoded;
    let read = PacketReader::new(3).read(&mut buf, Some(ProtocolVersion::V3_1_1));
    assert_eq!(read, Err(DecodeError::PacketTooLarge { size: 4, max: 3 }));
}
