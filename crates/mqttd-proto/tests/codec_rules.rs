//! One hand-written byte sequence per decoding rule: each must fail with the [`DecodeError`] that
//! names the rule, answered by the reason code the specification asks for; and the short forms
//! MQTT 5 allows must decode.

use bytes::BytesMut;

use mqttd_proto::codec::{DecodeError, PacketReader};
use mqttd_proto::{
    Packet, PacketId, PacketType, ProtocolVersion, PubResponse, ReasonCode, StringError,
};

use ProtocolVersion::{V3_1, V3_1_1, V5};

fn read(bytes: &[u8], version: Option<ProtocolVersion>) -> Result<Option<Packet>, DecodeError> {
    PacketReader::new(1 << 20).read(&mut BytesMut::from(bytes), version)
}

fn decode(bytes: &[u8], version: Option<ProtocolVersion>) -> Packet {
    match read(bytes, version) {
        Ok(Some(packet)) => packet,
        other => panic!("{bytes:02X?} did not decode: {other:?}"),
    }
}

/// Reads `bytes` expecting `error`, answered by `reason`, outside CONNECT.
#[track_caller]
fn assert_error(
    bytes: &[u8],
    version: Option<ProtocolVersion>,
    error: DecodeError,
    reason: ReasonCode,
) {
    let got = read(bytes, version).expect_err("must be refused");
    assert_eq!(got, error, "{bytes:02X?}");
    assert_eq!(got.reason_code(), reason, "{got}");
    assert_eq!(got.connect_version(), None);
}

/// Reads a CONNECT expecting `error` inside a CONNECT for `version`, answered by `reason`.
#[track_caller]
fn assert_connect_error(
    bytes: &[u8],
    version: ProtocolVersion,
    error: DecodeError,
    reason: ReasonCode,
) {
    let got = read(bytes, None).expect_err("must be refused");
    assert_eq!(
        got,
        DecodeError::InConnect {
            version,
            error: Box::new(error)
        },
        "{bytes:02X?}"
    );
    assert_eq!(got.reason_code(), reason, "{got}");
    assert_eq!(got.connect_version(), Some(version));
}

/// A packet: first byte, remaining length, body.
fn frame(first_byte: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128, "one-byte remaining length");
    let mut v = vec![first_byte, body.len() as u8];
    v.extend_from_slice(body);
    v
}

/// A length-prefixed string or binary field.
fn s(data: &[u8]) -> Vec<u8> {
    let mut v = (data.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// CONNECT with the given protocol name, level and flags, keep alive 60, then `rest`.
fn connect(name: &str, level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    frame(
        0x10,
        &cat(&[&s(name.as_bytes()), &[level, flags, 0x00, 0x3C], rest]),
    )
}

fn connect_v311(flags: u8, rest: &[u8]) -> Vec<u8> {
    connect("MQTT", 4, flags, rest)
}

/// An MQTT 5 CONNECT with the given properties and client identifier `c`, then `rest`.
fn connect_v5(flags: u8, properties: &[u8], rest: &[u8]) -> Vec<u8> {
    let props = cat(&[&[properties.len() as u8], properties]);
    connect("MQTT", 5, flags, &cat(&[&props, &s(b"c"), rest]))
}

/// An MQTT 5 PUBACK for packet identifier 1 with reason 0 and the given property bytes.
fn puback_v5_with_properties(properties: &[u8]) -> Vec<u8> {
    frame(
        0x40,
        &cat(&[&[0x00, 0x01, 0x00, properties.len() as u8], properties]),
    )
}

// ---------------------------------------------------------------------------------------------
// Fixed header
// ---------------------------------------------------------------------------------------------

#[test]
fn packet_type_zero_is_malformed() {
    for v in [None, Some(V3_1_1), Some(V5)] {
        assert_error(
            &[0x00, 0x00],
            v,
            DecodeError::InvalidPacketType(0),
            ReasonCode::MalformedPacket,
        );
    }
}

#[test]
fn auth_does_not_exist_before_mqtt5() {
    for v in [V3_1, V3_1_1] {
        assert_error(
            &[0xF0, 0x00],
            Some(v),
            DecodeError::InvalidPacketType(15),
            ReasonCode::MalformedPacket,
        );
    }
}

#[test]
fn fixed_header_flags_must_match_the_packet_type() {
    let cases: [(&[u8], PacketType, u8); 7] = [
        (&[0x41, 0x02, 0x00, 0x01], PacketType::PubAck, 0x01),
        (&[0x60, 0x02, 0x00, 0x01], PacketType::PubRel, 0x00),
        (
            &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
            PacketType::Subscribe,
            0x00,
        ),
        (
            &[0xA0, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'],
            PacketType::Unsubscribe,
            0x00,
        ),
        (&[0xC1, 0x00], PacketType::PingReq, 0x01),
        (&[0xE8, 0x00], PacketType::Disconnect, 0x08),
        (&[0x22, 0x02, 0x00, 0x00], PacketType::ConnAck, 0x02),
    ];
    for (bytes, packet, flags) in cases {
        assert_error(
            bytes,
            Some(V3_1_1),
            DecodeError::InvalidFlags { packet, flags },
            ReasonCode::MalformedPacket,
        );
    }
    // Before CONNECT too: a CONNECT with flags is not a CONNECT.
    let mut bytes = connect_v311(0x02, &s(b"c"));
    bytes[0] = 0x11;
    assert_error(
        &bytes,
        None,
        DecodeError::InvalidFlags {
            packet: PacketType::Connect,
            flags: 0x01,
        },
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn remaining_length_of_five_bytes_is_malformed() {
    // Four continuation bytes already prove the integer is too long.
    assert_eq!(read(&[0x30, 0x80, 0x80, 0x80], Some(V5)), Ok(None));
    for bytes in [
        &[0x30, 0x80, 0x80, 0x80, 0x80][..],
        &[0x30, 0x80, 0x80, 0x80, 0x80, 0x01],
        &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
    ] {
        assert_error(
            bytes,
            Some(V5),
            DecodeError::MalformedVariableInteger,
            ReasonCode::MalformedPacket,
        );
    }
}

#[test]
fn five_byte_varint_inside_properties_is_malformed() {
    // SUBSCRIBE with a subscription identifier of five bytes.
    let bytes = frame(
        0x82,
        &cat(&[
            &[0x00, 0x01, 0x06, 0x0B, 0x80, 0x80, 0x80, 0x80, 0x01],
            &s(b"a"),
            &[0x00],
        ]),
    );
    assert_error(
        &bytes,
        Some(V5),
        DecodeError::MalformedVariableInteger,
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn first_packet_must_be_connect() {
    assert_error(
        &[0xC0, 0x00],
        None,
        DecodeError::ExpectedConnect,
        ReasonCode::ProtocolError,
    );
    // Refused from the fixed header, before the body arrives.
    assert_error(
        &[0x30, 0x10],
        None,
        DecodeError::ExpectedConnect,
        ReasonCode::ProtocolError,
    );
    assert_eq!(read(&[0x30], None), Ok(None));
}

#[test]
fn oversized_packet_is_refused_from_the_header() {
    let mut buf = BytesMut::from(&[0x30, 0xFF, 0x7F][..]);
    let err = PacketReader::new(1024)
        .read(&mut buf, Some(V5))
        .unwrap_err();
    assert_eq!(
        err,
        DecodeError::PacketTooLarge {
            size: 16_386,
            max: 1024
        }
    );
    assert_eq!(err.reason_code(), ReasonCode::PacketTooLarge);
}

// ---------------------------------------------------------------------------------------------
// Lengths
// ---------------------------------------------------------------------------------------------

#[test]
fn truncated_body_is_malformed() {
    assert_error(
        &[0x40, 0x01, 0x00],
        Some(V3_1_1),
        DecodeError::UnexpectedEnd("packet identifier"),
        ReasonCode::MalformedPacket,
    );
    // MQTT 5 CONNACK always has a property length.
    assert_error(
        &[0x20, 0x02, 0x00, 0x00],
        Some(V5),
        DecodeError::UnexpectedEnd("property length"),
        ReasonCode::MalformedPacket,
    );
    // A string longer than the packet.
    assert_error(
        &[0x30, 0x03, 0x00, 0x05, b'a'],
        Some(V3_1_1),
        DecodeError::UnexpectedEnd("topic name"),
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn trailing_bytes_are_malformed() {
    assert_error(
        &[0xC0, 0x01, 0x00],
        Some(V5),
        DecodeError::TrailingBytes(1),
        ReasonCode::MalformedPacket,
    );
    // 3.1.1 acknowledgements and DISCONNECT have no reason code.
    assert_error(
        &[0x40, 0x03, 0x00, 0x01, 0x00],
        Some(V3_1_1),
        DecodeError::TrailingBytes(1),
        ReasonCode::MalformedPacket,
    );
    assert_error(
        &[0xE0, 0x01, 0x00],
        Some(V3_1_1),
        DecodeError::TrailingBytes(1),
        ReasonCode::MalformedPacket,
    );
    // A 3.1.1 UNSUBACK has no payload.
    assert_error(
        &[0xB0, 0x03, 0x00, 0x01, 0x00],
        Some(V3_1_1),
        DecodeError::TrailingBytes(1),
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn property_length_past_the_end_is_malformed() {
    assert_error(
        &[0x40, 0x04, 0x00, 0x01, 0x00, 0x0A],
        Some(V5),
        DecodeError::PropertyLength,
        ReasonCode::MalformedPacket,
    );
}

// ---------------------------------------------------------------------------------------------
// CONNECT
// ---------------------------------------------------------------------------------------------

#[test]
fn valid_connects_of_each_version_decode() {
    for (name, level, version) in [("MQIsdp", 3, V3_1), ("MQTT", 4, V3_1_1)] {
        let Packet::Connect(c) = decode(&connect(name, level, 0x02, &s(b"c")), None) else {
            panic!("not a CONNECT");
        };
        assert_eq!(c.protocol, version);
        assert!(c.clean_start);
        assert_eq!(c.keep_alive, 60);
        assert_eq!(c.client_id.as_str(), "c");
    }
    let Packet::Connect(c) = decode(&connect_v5(0x00, &[], &[]), None) else {
        panic!("not a CONNECT");
    };
    assert_eq!(c.protocol, V5);
}

/// Mosquitto's bridge flag, the high bit of the level of a 3.1 or 3.1.1 CONNECT, decodes into
/// `properties.bridge` and encodes back into the same byte.
#[test]
fn the_bridge_bit_of_the_protocol_level_round_trips() {
    for (name, level, version) in [("MQIsdp", 0x83, V3_1), ("MQTT", 0x84, V3_1_1)] {
        let wire = connect(name, level, 0x02, &s(b"c"));
        let packet = decode(&wire, None);
        let Packet::Connect(c) = &packet else {
            panic!("not a CONNECT");
        };
        assert_eq!(c.protocol, version);
        assert!(c.properties.bridge);
        let mut out = BytesMut::new();
        packet.encode(version, &mut out).unwrap();
        assert_eq!(&out[..], &wire[..], "{name} {level:#x}");
    }
    let Packet::Connect(c) = decode(&connect("MQTT", 4, 0x02, &s(b"c")), None) else {
        panic!("not a CONNECT");
    };
    assert!(!c.properties.bridge);
}

#[test]
fn unknown_protocol_is_refused_before_the_version_is_known() {
    let cases = [
        (
            connect("MQTT", 6, 0x02, &s(b"c")),
            DecodeError::UnsupportedProtocolLevel(6),
        ),
        (
            connect("MQTT", 3, 0x02, &s(b"c")),
            DecodeError::UnsupportedProtocolLevel(3),
        ),
        (
            connect("MQIsdp", 4, 0x02, &s(b"c")),
            DecodeError::UnsupportedProtocolLevel(4),
        ),
        (
            connect("MQTX", 4, 0x02, &s(b"c")),
            DecodeError::InvalidProtocolName,
        ),
        (
            connect("mqtt", 4, 0x02, &s(b"c")),
            DecodeError::InvalidProtocolName,
        ),
    ];
    for (bytes, error) in cases {
        // connect_version() is None: the client gets a CONNACK in the server's choice of
        // format (or none), since its own version is unknown.
        assert_error(&bytes, None, error, ReasonCode::UnsupportedProtocolVersion);
    }
}

#[test]
fn errors_after_the_protocol_level_carry_the_version() {
    // Truncated right after the level.
    let bytes = frame(0x10, &cat(&[&s(b"MQTT"), &[5]]));
    assert_connect_error(
        &bytes,
        V5,
        DecodeError::UnexpectedEnd("connect flags"),
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn reserved_connect_flag_is_malformed() {
    assert_connect_error(
        &connect_v311(0x03, &s(b"c")),
        V3_1_1,
        DecodeError::ReservedFlag("CONNECT flags"),
        ReasonCode::MalformedPacket,
    );
    assert_connect_error(
        &connect_v5(0x01, &[], &[]),
        V5,
        DecodeError::ReservedFlag("CONNECT flags"),
        ReasonCode::MalformedPacket,
    );
    assert_connect_error(
        &connect("MQIsdp", 3, 0x01, &s(b"c")),
        V3_1,
        DecodeError::ReservedFlag("CONNECT flags"),
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn will_qos_3_is_malformed() {
    let will = cat(&[&s(b"c"), &s(b"w"), &s(b"bye")]);
    assert_connect_error(
        &connect_v311(0x04 | 0x18, &will),
        V3_1_1,
        DecodeError::InvalidQoS("will"),
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn will_qos_or_retain_without_will_is_malformed() {
    for flags in [0x08, 0x10, 0x20] {
        assert_connect_error(
            &connect_v311(flags, &s(b"c")),
            V3_1_1,
            DecodeError::WillFlagsWithoutWill,
            ReasonCode::MalformedPacket,
        );
    }
}

#[test]
fn wildcard_in_will_topic_is_topic_name_invalid() {
    let will = cat(&[&s(b"c"), &s(b"w/+"), &s(b"bye")]);
    assert_connect_error(
        &connect_v311(0x04, &will),
        V3_1_1,
        DecodeError::InvalidString {
            field: "topic name",
            error: StringError::WildcardInTopicName,
        },
        ReasonCode::TopicNameInvalid,
    );
}

#[test]
fn password_needs_a_user_name_before_mqtt5() {
    let rest = cat(&[&s(b"c"), &s(b"secret")]);
    assert_connect_error(
        &connect_v311(0x40, &rest),
        V3_1_1,
        DecodeError::PasswordWithoutUsername,
        ReasonCode::MalformedPacket,
    );
    assert_connect_error(
        &connect("MQIsdp", 3, 0x40, &rest),
        V3_1,
        DecodeError::PasswordWithoutUsername,
        ReasonCode::MalformedPacket,
    );
    // MQTT 5 allows it.
    let Packet::Connect(c) = decode(&connect_v5(0x40, &[], &s(b"secret")), None) else {
        panic!("not a CONNECT");
    };
    assert_eq!(c.username, None);
    assert_eq!(c.password.as_deref(), Some(&b"secret"[..]));
}

#[test]
fn client_identifier_that_is_not_utf8_is_refused_as_identifier() {
    // The codec answers an undecodable client identifier with "identifier rejected" (0x02 in
    // 3.1.1), which a 3.1.1 client understands better than a dropped connection.
    assert_connect_error(
        &connect_v311(0x02, &s(&[0xC3, 0x28])),
        V3_1_1,
        DecodeError::InvalidString {
            field: "client identifier",
            error: StringError::InvalidUtf8,
        },
        ReasonCode::ClientIdentifierNotValid,
    );
}

#[test]
fn duplicate_connect_property_is_a_protocol_error() {
    let session_expiry = [0x11, 0x00, 0x00, 0x00, 0x0A];
    assert_connect_error(
        &connect_v5(0x00, &cat(&[&session_expiry, &session_expiry]), &[]),
        V5,
        DecodeError::DuplicateProperty(0x11),
        ReasonCode::ProtocolError,
    );
}

#[test]
fn zero_receive_maximum_is_a_protocol_error() {
    assert_connect_error(
        &connect_v5(0x00, &[0x21, 0x00, 0x00], &[]),
        V5,
        DecodeError::InvalidPropertyValue(0x21),
        ReasonCode::ProtocolError,
    );
}

#[test]
fn property_of_another_packet_is_a_protocol_error() {
    // Topic alias in CONNECT.
    assert_connect_error(
        &connect_v5(0x00, &[0x23, 0x00, 0x01], &[]),
        V5,
        DecodeError::PropertyNotAllowed {
            id: 0x23,
            packet: PacketType::Connect,
        },
        ReasonCode::ProtocolError,
    );
}

// ---------------------------------------------------------------------------------------------
// CONNACK
// ---------------------------------------------------------------------------------------------

#[test]
fn connack_reserved_flags() {
    assert_error(
        &[0x20, 0x02, 0x02, 0x00],
        Some(V3_1_1),
        DecodeError::ReservedFlag("CONNACK flags"),
        ReasonCode::MalformedPacket,
    );
    // MQTT 3.1 had no flags at all: the byte is reserved and ignored.
    let Packet::ConnAck(ack) = decode(&[0x20, 0x02, 0x03, 0x00], Some(V3_1)) else {
        panic!("not a CONNACK");
    };
    assert!(!ack.session_present);
}

#[test]
fn invalid_reason_codes_are_malformed() {
    let cases: [(&[u8], ProtocolVersion, u8, PacketType); 7] = [
        // Return code 6 does not exist in 3.1.1.
        (&[0x20, 0x02, 0x00, 0x06], V3_1_1, 0x06, PacketType::ConnAck),
        // Granted QoS 1 is not an answer to a PUBLISH.
        (
            &[0x40, 0x03, 0x00, 0x01, 0x01],
            V5,
            0x01,
            PacketType::PubAck,
        ),
        // Not a reason code at all.
        (
            &[0x50, 0x03, 0x00, 0x01, 0x03],
            V5,
            0x03,
            PacketType::PubRec,
        ),
        (
            &[0x62, 0x03, 0x00, 0x01, 0x10],
            V5,
            0x10,
            PacketType::PubRel,
        ),
        // 3.1.1 SUBACK knows only 0, 1, 2 and 0x80.
        (
            &[0x90, 0x03, 0x00, 0x01, 0x83],
            V3_1_1,
            0x83,
            PacketType::SubAck,
        ),
        (&[0xE0, 0x01, 0x84], V5, 0x84, PacketType::Disconnect),
        (&[0xF0, 0x01, 0x01], V5, 0x01, PacketType::Auth),
    ];
    for (bytes, version, code, packet) in cases {
        assert_error(
            bytes,
            Some(version),
            DecodeError::InvalidReasonCode { code, packet },
            ReasonCode::MalformedPacket,
        );
    }
}

#[test]
fn maximum_qos_2_is_a_protocol_error() {
    assert_error(
        &[0x20, 0x05, 0x00, 0x00, 0x02, 0x24, 0x02],
        Some(V5),
        DecodeError::InvalidPropertyValue(0x24),
        ReasonCode::ProtocolError,
    );
}

// ---------------------------------------------------------------------------------------------
// PUBLISH
// ---------------------------------------------------------------------------------------------

#[test]
fn publish_qos_3_is_malformed() {
    assert_error(
        &frame(0x36, &cat(&[&s(b"t"), &[0x00, 0x01]])),
        Some(V3_1_1),
        DecodeError::InvalidQoS("PUBLISH"),
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn dup_on_qos_0_is_malformed() {
    assert_error(
        &frame(0x38, &s(b"t")),
        Some(V3_1_1),
        DecodeError::DupOnQoS0,
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn zero_packet_identifier_is_malformed() {
    let cases: [(&[u8], ProtocolVersion); 4] = [
        (&[0x32, 0x05, 0x00, 0x01, b't', 0x00, 0x00], V3_1_1),
        (&[0x40, 0x02, 0x00, 0x00], V5),
        (&[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00], V3_1_1),
        (&[0xB0, 0x02, 0x00, 0x00], V3_1_1),
    ];
    for (bytes, version) in cases {
        assert_error(
            bytes,
            Some(version),
            DecodeError::ZeroPacketId,
            ReasonCode::MalformedPacket,
        );
    }
}

#[test]
fn wildcard_in_topic_name_is_topic_name_invalid() {
    for topic in [&b"a/+"[..], b"#", b"a/b#"] {
        assert_error(
            &frame(0x30, &s(topic)),
            Some(V3_1_1),
            DecodeError::InvalidString {
                field: "topic name",
                error: StringError::WildcardInTopicName,
            },
            ReasonCode::TopicNameInvalid,
        );
    }
}

#[test]
fn topic_name_must_be_valid_utf8_without_nul() {
    assert_error(
        &frame(0x30, &s(&[0xFF])),
        Some(V3_1_1),
        DecodeError::InvalidString {
            field: "topic name",
            error: StringError::InvalidUtf8,
        },
        ReasonCode::MalformedPacket,
    );
    assert_error(
        &frame(0x30, &s(b"a\0b")),
        Some(V5),
        DecodeError::InvalidString {
            field: "topic name",
            error: StringError::NullCharacter,
        },
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn publish_needs_a_topic_or_an_alias() {
    // MQTT 5: an empty topic is allowed only with a topic alias.
    assert_error(
        &frame(0x30, &[0x00, 0x00, 0x00]),
        Some(V5),
        DecodeError::MissingTopic,
        ReasonCode::ProtocolError,
    );
    let Packet::Publish(p) = decode(
        &frame(0x30, &[0x00, 0x00, 0x03, 0x23, 0x00, 0x07]),
        Some(V5),
    ) else {
        panic!("not a PUBLISH");
    };
    assert!(p.topic.is_empty());
    assert_eq!(p.properties.topic_alias.map(|a| a.get()), Some(7));
    // Before MQTT 5 an empty topic name is simply invalid.
    assert_error(
        &frame(0x30, &[0x00, 0x00]),
        Some(V3_1_1),
        DecodeError::InvalidString {
            field: "topic name",
            error: StringError::Empty,
        },
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn invalid_publish_property_values_are_protocol_errors() {
    let cases: [(&[u8], u8); 3] = [
        // Payload format indicator 2.
        (&[0x02, 0x01, 0x02], 0x01),
        // Topic alias 0.
        (&[0x03, 0x23, 0x00, 0x00], 0x23),
        // Subscription identifier 0.
        (&[0x02, 0x0B, 0x00], 0x0B),
    ];
    for (properties, id) in cases {
        assert_error(
            &frame(0x30, &cat(&[&s(b"t"), properties])),
            Some(V5),
            DecodeError::InvalidPropertyValue(id),
            ReasonCode::ProtocolError,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Properties in general
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_property_is_malformed() {
    assert_error(
        &puback_v5_with_properties(&[0x7F]),
        Some(V5),
        DecodeError::UnknownProperty(0x7F),
        ReasonCode::MalformedPacket,
    );
    // An identifier that needs two bytes.
    assert_error(
        &puback_v5_with_properties(&[0x80, 0x02]),
        Some(V5),
        DecodeError::UnknownProperty(0xFF),
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn duplicate_property_is_a_protocol_error() {
    let reason_string = cat(&[&[0x1F], &s(b"why")]);
    assert_error(
        &puback_v5_with_properties(&cat(&[&reason_string, &reason_string])),
        Some(V5),
        DecodeError::DuplicateProperty(0x1F),
        ReasonCode::ProtocolError,
    );
}

#[test]
fn user_properties_may_repeat() {
    let user = cat(&[&[0x26], &s(b"k"), &s(b"v")]);
    let Packet::PubAck(ack) = decode(&puback_v5_with_properties(&cat(&[&user, &user])), Some(V5))
    else {
        panic!("not a PUBACK");
    };
    assert_eq!(ack.properties.user_properties.len(), 2);
}

#[test]
fn property_not_allowed_in_the_packet_is_a_protocol_error() {
    // Session expiry interval in PUBACK.
    assert_error(
        &puback_v5_with_properties(&[0x11, 0x00, 0x00, 0x00, 0x01]),
        Some(V5),
        DecodeError::PropertyNotAllowed {
            id: 0x11,
            packet: PacketType::PubAck,
        },
        ReasonCode::ProtocolError,
    );
}

// ---------------------------------------------------------------------------------------------
// SUBSCRIBE and UNSUBSCRIBE
// ---------------------------------------------------------------------------------------------

#[test]
fn subscribe_without_filters_is_a_protocol_error() {
    assert_error(
        &[0x82, 0x02, 0x00, 0x01],
        Some(V3_1_1),
        DecodeError::NoTopicFilters(PacketType::Subscribe),
        ReasonCode::ProtocolError,
    );
    assert_error(
        &[0x82, 0x03, 0x00, 0x01, 0x00],
        Some(V5),
        DecodeError::NoTopicFilters(PacketType::Subscribe),
        ReasonCode::ProtocolError,
    );
    assert_error(
        &[0xA2, 0x02, 0x00, 0x01],
        Some(V3_1_1),
        DecodeError::NoTopicFilters(PacketType::Unsubscribe),
        ReasonCode::ProtocolError,
    );
}

fn subscribe(version: ProtocolVersion, filter: &[u8], options: u8) -> Vec<u8> {
    let properties: &[u8] = if version.is_v5() { &[0x00] } else { &[] };
    frame(
        0x82,
        &cat(&[&[0x00, 0x01], properties, &s(filter), &[options]]),
    )
}

#[test]
fn retain_handling_3_is_a_protocol_error() {
    assert_error(
        &subscribe(V5, b"a", 0x30),
        Some(V5),
        DecodeError::InvalidRetainHandling,
        ReasonCode::ProtocolError,
    );
}

#[test]
fn reserved_subscription_option_bits_are_malformed() {
    assert_error(
        &subscribe(V5, b"a", 0x40),
        Some(V5),
        DecodeError::ReservedFlag("subscription options"),
        ReasonCode::MalformedPacket,
    );
    // No local, retain as published and retain handling do not exist in 3.1.1.
    for options in [0x04, 0x08, 0x30] {
        assert_error(
            &subscribe(V3_1_1, b"a", options),
            Some(V3_1_1),
            DecodeError::ReservedFlag("subscription options"),
            ReasonCode::MalformedPacket,
        );
    }
}

#[test]
fn subscription_qos_3_is_malformed() {
    assert_error(
        &subscribe(V3_1_1, b"a", 0x03),
        Some(V3_1_1),
        DecodeError::InvalidQoS("SUBSCRIBE"),
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn misplaced_wildcard_in_filter_is_malformed() {
    assert_error(
        &subscribe(V3_1_1, b"a/#/b", 0x00),
        Some(V3_1_1),
        DecodeError::InvalidString {
            field: "topic filter",
            error: StringError::MisplacedWildcard,
        },
        ReasonCode::MalformedPacket,
    );
}

// ---------------------------------------------------------------------------------------------
// Short forms
// ---------------------------------------------------------------------------------------------

#[test]
fn acknowledgements_with_remaining_length_2_are_success() {
    let id = PacketId::new(0x0102).unwrap();
    let cases = [
        (0x40, Packet::PubAck as fn(PubResponse) -> Packet),
        (0x50, Packet::PubRec),
        (0x62, Packet::PubRel),
        (0x70, Packet::PubComp),
    ];
    for (first_byte, wrap) in cases {
        for v in [V3_1, V3_1_1, V5] {
            assert_eq!(
                decode(&[first_byte, 0x02, 0x01, 0x02], Some(v)),
                wrap(PubResponse::success(id))
            );
        }
    }
}

#[test]
fn acknowledgement_with_reason_and_no_properties() {
    let Packet::PubAck(ack) = decode(&[0x40, 0x03, 0x00, 0x01, 0x10], Some(V5)) else {
        panic!("not a PUBACK");
    };
    assert_eq!(ack.reason, ReasonCode::NoMatchingSubscribers);
    assert!(ack.properties.is_empty());
}

#[test]
fn disconnect_with_remaining_length_0_is_success() {
    for v in [V3_1, V3_1_1, V5] {
        let Packet::Disconnect(d) = decode(&[0xE0, 0x00], Some(v)) else {
            panic!("not a DISCONNECT");
        };
        assert_eq!(d.reason, ReasonCode::Success);
        assert_eq!(d.properties, Default::default());
    }
    let Packet::Disconnect(d) = decode(&[0xE0, 0x01, 0x04], Some(V5)) else {
        panic!("not a DISCONNECT");
    };
    assert_eq!(d.reason, ReasonCode::DisconnectWithWillMessage);
}

#[test]
fn auth_with_remaining_length_0_is_success() {
    let Packet::Auth(auth) = decode(&[0xF0, 0x00], Some(V5)) else {
        panic!("not an AUTH");
    };
    assert_eq!(auth.reason, ReasonCode::Success);
    assert_eq!(auth.properties, Default::default());
}

#[test]
fn non_minimal_variable_integers_are_malformed() {
    // PINGREQ whose remaining length 0 is written in two bytes [MQTT-1.5.5-1].
    let mut buf = BytesMut::from(&[0xC0, 0x80, 0x00][..]);
    let err = PacketReader::new(1024)
        .read(&mut buf, Some(V5))
        .unwrap_err();
    assert_eq!(err, DecodeError::MalformedVariableInteger);
    assert_eq!(err.reason_code(), ReasonCode::MalformedPacket);
}
