//! Writes the seed corpus of the `decode_packet` fuzz target: a few small valid encodings of
//! every packet type for every protocol version, and a few whole connection streams.
//!
//! ```sh
//! cargo run -p mqttd-proto --example fuzz_seeds -- fuzz/corpus/decode_packet
//! ```
//!
//! File names say what a seed holds, so rerunning the program overwrites its own seeds and
//! leaves any other file in the directory alone.

use std::num::{NonZeroU16, NonZeroU32};
use std::path::PathBuf;

use bytes::Bytes;

use mqttd_proto::{
    AckProperties, Auth, AuthProperties, ConnAck, ConnAckProperties, Connect, ConnectProperties,
    Disconnect, DisconnectProperties, MqttStr, Packet, PacketId, ProtocolVersion, PubResponse,
    Publish, PublishProperties, QoS, ReasonCode, RetainHandling, SubAck, Subscribe,
    SubscribeProperties, Subscription, SubscriptionOptions, TopicFilter, TopicName, UnsubAck,
    Unsubscribe, Will, WillProperties,
};

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus/decode_packet".to_owned()),
    );
    std::fs::create_dir_all(&dir)?;
    let mut written = 0;
    for version in [
        ProtocolVersion::V3_1,
        ProtocolVersion::V3_1_1,
        ProtocolVersion::V5,
    ] {
        let tag = match version {
            ProtocolVersion::V3_1 => "v3.1",
            ProtocolVersion::V3_1_1 => "v3.1.1",
            ProtocolVersion::V5 => "v5",
        };
        let seeds = seeds(version)?;
        for (name, packet) in &seeds {
            std::fs::write(
                dir.join(format!("{tag}-{name}")),
                encode(version, [packet])?,
            )?;
            written += 1;
        }
        // A connection's stream: CONNECT, then the client's usual packets.
        let stream = seeds
            .iter()
            .filter(|(name, _)| {
                [
                    "connect-full",
                    "publish-qos1",
                    "subscribe",
                    "pingreq",
                    "disconnect",
                ]
                .contains(name)
            })
            .map(|(_, packet)| packet);
        std::fs::write(dir.join(format!("{tag}-stream")), encode(version, stream)?)?;
        written += 1;
    }
    println!("wrote {written} seeds to {}", dir.display());
    Ok(())
}

fn encode<'a>(
    version: ProtocolVersion,
    packets: impl IntoIterator<Item = &'a Packet>,
) -> Result<Vec<u8>, Error> {
    let mut buf = Vec::new();
    for packet in packets {
        packet.encode(version, &mut buf)?;
    }
    Ok(buf)
}

fn s(text: &'static str) -> Result<MqttStr, Error> {
    Ok(MqttStr::from_static(text)?)
}

fn id(value: u16) -> Result<PacketId, Error> {
    PacketId::new(value).ok_or_else(|| "zero packet identifier".into())
}

/// `value` in MQTT 5; the default, which older versions encode as nothing, otherwise.
fn only_v5<T: Default>(v5: bool, value: T) -> T {
    if v5 {
        value
    } else {
        T::default()
    }
}

/// The seeds for one version, each with its name. Fields the version cannot carry stay at
/// their defaults.
fn seeds(version: ProtocolVersion) -> Result<Vec<(&'static str, Packet)>, Error> {
    let v5 = version.is_v5();
    let users = only_v5(v5, vec![(s("k")?, s("v")?)]);
    let ack_properties = only_v5(
        v5,
        AckProperties {
            reason_string: Some(s("why")?),
            user_properties: users.clone(),
        },
    );
    let reason = |code| if v5 { code } else { ReasonCode::Success };

    let minimal_connect = Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 60,
        client_id: "c".try_into()?,
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    };
    let full_connect = Connect {
        clean_start: false,
        client_id: "client-1".try_into()?,
        will: Some(Will {
            topic: "will/t".try_into()?,
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: only_v5(
                v5,
                WillProperties {
                    will_delay_interval: Some(5),
                    payload_format_indicator: Some(true),
                    message_expiry_interval: Some(60),
                    content_type: Some(s("text/plain")?),
                    response_topic: Some("r".try_into()?),
                    correlation_data: Some(Bytes::from_static(b"\x01")),
                    user_properties: users.clone(),
                },
            ),
        }),
        username: Some(s("user")?),
        password: Some(Bytes::from_static(b"pass")),
        properties: only_v5(
            v5,
            ConnectProperties {
                session_expiry_interval: Some(3600),
                receive_maximum: NonZeroU16::new(10),
                maximum_packet_size: NonZeroU32::new(4096),
                topic_alias_maximum: Some(8),
                request_response_information: Some(true),
                request_problem_information: Some(false),
                user_properties: users.clone(),
                authentication_method: Some(s("PLAIN")?),
                authentication_data: Some(Bytes::from_static(b"token")),
                bridge: false,
            },
        ),
        ..minimal_connect.clone()
    };
    let connack = ConnAck {
        session_present: version != ProtocolVersion::V3_1,
        reason: ReasonCode::Success,
        properties: only_v5(
            v5,
            ConnAckProperties {
                session_expiry_interval: Some(60),
                receive_maximum: NonZeroU16::new(20),
                maximum_qos: Some(QoS::AtLeastOnce),
                retain_available: Some(true),
                maximum_packet_size: NonZeroU32::new(65536),
                assigned_client_identifier: Some("auto-1".try_into()?),
                topic_alias_maximum: Some(16),
                reason_string: Some(s("ok")?),
                user_properties: users.clone(),
                wildcard_subscription_available: Some(true),
                subscription_identifiers_available: Some(true),
                shared_subscription_available: Some(false),
                server_keep_alive: Some(30),
                response_information: Some(s("resp")?),
                server_reference: Some(s("other:1883")?),
                authentication_method: None,
                authentication_data: None,
            },
        ),
    };
    let publish_properties = only_v5(
        v5,
        PublishProperties {
            payload_format_indicator: Some(true),
            message_expiry_interval: Some(30),
            topic_alias: NonZeroU16::new(1),
            response_topic: Some("reply/to".try_into()?),
            correlation_data: Some(Bytes::from_static(b"corr")),
            user_properties: users.clone(),
            subscription_identifiers: vec![NonZeroU32::MIN],
            content_type: Some(s("json")?),
        },
    );
    let publish = |qos, packet_id| -> Result<Packet, Error> {
        Ok(Packet::Publish(Publish {
            dup: false,
            qos,
            retain: qos == QoS::AtMostOnce,
            topic: "sensors/room1/temp".try_into()?,
            packet_id,
            properties: publish_properties.clone(),
            payload: Bytes::from_static(b"21.5"),
        }))
    };
    let response = |code| -> Result<PubResponse, Error> {
        Ok(PubResponse {
            packet_id: id(7)?,
            reason: reason(code),
            properties: ack_properties.clone(),
        })
    };
    let options = |qos| SubscriptionOptions {
        qos,
        no_local: v5,
        retain_as_published: v5,
        retain_handling: if v5 {
            RetainHandling::SendIfNew
        } else {
            RetainHandling::SendAtSubscribe
        },
    };
    let filter = |text: &'static str| -> Result<TopicFilter, Error> { Ok(text.try_into()?) };

    let mut seeds = vec![
        (
            "connect-minimal",
            Packet::Connect(Box::new(minimal_connect)),
        ),
        ("connect-full", Packet::Connect(Box::new(full_connect))),
        ("connack", Packet::ConnAck(connack)),
        (
            "connack-refused",
            Packet::ConnAck(ConnAck {
                session_present: false,
                reason: ReasonCode::NotAuthorized,
                properties: ConnAckProperties::default(),
            }),
        ),
        ("publish-qos0", publish(QoS::AtMostOnce, None)?),
        ("publish-qos1", publish(QoS::AtLeastOnce, Some(id(1)?))?),
        ("publish-qos2", publish(QoS::ExactlyOnce, Some(id(2)?))?),
        ("puback", Packet::PubAck(PubResponse::success(id(1)?))),
        (
            "puback-reason",
            Packet::PubAck(response(ReasonCode::NoMatchingSubscribers)?),
        ),
        (
            "pubrec",
            Packet::PubRec(response(ReasonCode::QuotaExceeded)?),
        ),
        (
            "pubrel",
            Packet::PubRel(response(ReasonCode::PacketIdentifierNotFound)?),
        ),
        ("pubcomp", Packet::PubComp(response(ReasonCode::Success)?)),
        (
            "subscribe",
            Packet::Subscribe(Subscribe {
                packet_id: id(3)?,
                properties: only_v5(
                    v5,
                    SubscribeProperties {
                        subscription_identifier: NonZeroU32::new(42),
                        user_properties: users.clone(),
                    },
                ),
                filters: vec![
                    Subscription {
                        filter: filter("sensors/+/temp")?,
                        options: options(QoS::AtLeastOnce),
                    },
                    Subscription {
                        filter: filter("$share/g/alerts/#")?,
                        options: options(QoS::ExactlyOnce),
                    },
                ],
            }),
        ),
        (
            "suback",
            Packet::SubAck(SubAck {
                packet_id: id(3)?,
                properties: ack_properties.clone(),
                reasons: vec![
                    ReasonCode::GrantedQoS1,
                    reason(ReasonCode::NotAuthorized),
                    ReasonCode::UnspecifiedError,
                ],
            }),
        ),
        (
            "unsubscribe",
            Packet::Unsubscribe(Unsubscribe {
                packet_id: id(4)?,
                user_properties: users.clone(),
                filters: vec![filter("sensors/+/temp")?, filter("#")?],
            }),
        ),
        (
            "unsuback",
            Packet::UnsubAck(UnsubAck {
                packet_id: id(4)?,
                properties: ack_properties.clone(),
                reasons: only_v5(
                    v5,
                    vec![ReasonCode::Success, ReasonCode::NoSubscriptionExisted],
                ),
            }),
        ),
        ("pingreq", Packet::PingReq),
        ("pingresp", Packet::PingResp),
        (
            "disconnect",
            Packet::Disconnect(Disconnect::new(ReasonCode::Success)),
        ),
    ];
    if v5 {
        let topic_alias_only = Packet::Publish(Publish {
            dup: true,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: TopicName::empty(),
            packet_id: Some(id(9)?),
            properties: PublishProperties {
                topic_alias: NonZeroU16::new(1),
                ..PublishProperties::default()
            },
            payload: Bytes::new(),
        });
        seeds.extend([
            ("publish-alias", topic_alias_only),
            (
                "disconnect-reason",
                Packet::Disconnect(Disconnect {
                    reason: ReasonCode::SessionTakenOver,
                    properties: DisconnectProperties {
                        session_expiry_interval: Some(0),
                        reason_string: Some(s("bye")?),
                        user_properties: users.clone(),
                        server_reference: Some(s("other")?),
                    },
                }),
            ),
            (
                "auth",
                Packet::Auth(Auth {
                    reason: ReasonCode::ContinueAuthentication,
                    properties: AuthProperties {
                        authentication_method: Some(s("SCRAM-SHA-256")?),
                        authentication_data: Some(Bytes::from_static(b"n,,n=user,r=abc")),
                        reason_string: None,
                        user_properties: users,
                    },
                }),
            ),
            (
                "auth-empty",
                Packet::Auth(Auth {
                    reason: ReasonCode::Success,
                    properties: AuthProperties::default(),
                }),
            ),
        ]);
    }
    Ok(seeds)
}
