//! Writes the seed corpus of the `session` fuzz target: a few meaningful scenarios for each
//! role, each checked to read back as itself and to get where it means to.
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example session_seeds -- fuzz/corpus/session
//! ```
//!
//! File names say what a seed plays, so rerunning the program overwrites its own seeds and
//! leaves any other file in the directory alone.

use std::path::PathBuf;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use mqttd_fuzz::session::build::reason_byte;
use mqttd_fuzz::session::input::*;
use mqttd_fuzz::session::{run, Encode, Input, Stats};
use mqttd_proto::{
    Connect, ConnectProperties, MqttStr, Packet, PacketId, ProtocolVersion, Publish, QoS,
    ReasonCode as R,
};

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus/session".to_owned()),
    );
    std::fs::create_dir_all(&dir)?;
    let seeds = seeds()?;
    for (name, input, expect) in &seeds {
        let bytes = input.to_bytes();
        let decoded = Input::arbitrary_take_rest(Unstructured::new(&bytes))?;
        assert_eq!(&decoded, input, "{name} does not read back as itself");
        let stats = run(input);
        assert!(
            expect(&stats),
            "{name} did not get where it means to: {stats:?}"
        );
        std::fs::write(dir.join(name), &bytes)?;
        println!("{name}: {} bytes, {stats:?}", bytes.len());
    }
    println!("wrote {} seeds to {}", seeds.len(), dir.display());
    Ok(())
}

type Expect = fn(&Stats) -> bool;

fn qos(q: QoS) -> u8 {
    q.bits()
}

fn message(q: QoS) -> MessageSpec {
    MessageSpec {
        qos: qos(q),
        payload: 2,
        ..MessageSpec::default()
    }
}

fn publish(q: QoS, id: u16) -> PublishSpec {
    PublishSpec {
        message: message(q),
        id: IdRef::Raw { id },
        ..PublishSpec::default()
    }
}

/// An acknowledgement of the most recent identifier that fits.
fn recent() -> AckSpec {
    AckSpec::default()
}

fn raw_ack(id: u16) -> AckSpec {
    AckSpec {
        id: IdRef::Raw { id },
        ..AckSpec::default()
    }
}

fn auth(reason: R, data: u8) -> AuthSpec {
    AuthSpec {
        reason: reason_byte(reason),
        method: 1,
        data: Some(data),
    }
}

fn seconds(amount: u16) -> TimeStep {
    TimeStep { amount, unit: 1 }
}

fn server(ops: Vec<ServerOp>) -> Input {
    Input::Server {
        setup: ServerSetup::default(),
        ops,
    }
}

fn accept(session: SessionChoice) -> ServerOp {
    ServerOp::Accept {
        session,
        assign_client_id: false,
        auth_data: None,
        user_properties: 0,
        response_information: false,
    }
}

fn deliver(q: QoS) -> ServerOp {
    ServerOp::Deliver {
        message: message(q),
        subscription_ids: Vec::new(),
    }
}

fn new_connection() -> ServerOp {
    ServerOp::NewConnection {
        takeover: false,
        ack_pending: false,
    }
}

fn encode(version: ProtocolVersion, packets: &[Packet]) -> Result<Vec<u8>, Error> {
    let mut buf = Vec::new();
    for packet in packets {
        packet.encode(version, &mut buf)?;
    }
    Ok(buf)
}

fn server_seeds() -> Result<Vec<(&'static str, Input, Expect)>, Error> {
    let resume = ConnectSpec {
        resume: true,
        session_expiry: Some(3600),
        receive_maximum: 2,
        ..ConnectSpec::default()
    };
    let will = WillSpec {
        qos: 1,
        payload: 1,
        delay: Some(5),
        ..WillSpec::default()
    };
    let stream = encode(
        ProtocolVersion::V5,
        &[
            Packet::Connect(Box::new(Connect {
                protocol: ProtocolVersion::V5,
                clean_start: true,
                keep_alive: 30,
                client_id: "raw".try_into()?,
                will: None,
                username: Some(MqttStr::try_from("user")?),
                password: Some(Bytes::from_static(b"pass")),
                properties: ConnectProperties::default(),
            })),
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: "a/b".try_into()?,
                packet_id: PacketId::new(3),
                properties: Default::default(),
                payload: Bytes::from_static(b"hello"),
            }),
            Packet::PingReq,
        ],
    )?;
    Ok(vec![
        (
            "server-v5-qos2-both-ways",
            server(vec![
                ServerOp::Connect {
                    spec: ConnectSpec::default(),
                },
                accept(SessionChoice::Fresh),
                ServerOp::Publish {
                    spec: publish(QoS::ExactlyOnce, 7),
                },
                ServerOp::PublishAck {
                    id: IdRef::default(),
                    reason: 0,
                },
                ServerOp::PubRel { ack: recent() },
                deliver(QoS::ExactlyOnce),
                ServerOp::PubRec { ack: recent() },
                ServerOp::PubComp { ack: recent() },
                ServerOp::Disconnect {
                    reason: 0,
                    session_expiry: None,
                    reason_string: false,
                },
            ]),
            |s| s.connected == 1 && s.qos2_received == 1 && s.qos2_sent == 1,
        ),
        (
            "server-v5-reconnect-resume",
            server(vec![
                ServerOp::Connect {
                    spec: resume.clone(),
                },
                accept(SessionChoice::Fresh),
                deliver(QoS::ExactlyOnce),
                deliver(QoS::AtLeastOnce),
                deliver(QoS::AtLeastOnce),
                ServerOp::PubRec { ack: raw_ack(1) },
                ServerOp::ConnectionLost,
                new_connection(),
                ServerOp::Connect { spec: resume },
                accept(SessionChoice::Stored { index: 0 }),
                ServerOp::PubComp { ack: raw_ack(1) },
                ServerOp::PubAck { ack: raw_ack(2) },
                ServerOp::PubAck { ack: raw_ack(3) },
            ]),
            |s| s.connections == 2 && s.connected == 2 && s.resent >= 2 && s.qos2_sent == 1,
        ),
        (
            "server-v5-auth-and-reauth",
            server(vec![
                ServerOp::Connect {
                    spec: ConnectSpec {
                        auth_method: 1,
                        auth_data: Some(4),
                        ..ConnectSpec::default()
                    },
                },
                ServerOp::AuthContinue { data: Some(8) },
                ServerOp::Auth {
                    spec: auth(R::ContinueAuthentication, 8),
                },
                ServerOp::Accept {
                    session: SessionChoice::Fresh,
                    assign_client_id: false,
                    auth_data: Some(4),
                    user_properties: 0,
                    response_information: false,
                },
                ServerOp::Auth {
                    spec: auth(R::ReAuthenticate, 4),
                },
                ServerOp::AuthContinue { data: Some(8) },
                ServerOp::Auth {
                    spec: auth(R::ContinueAuthentication, 8),
                },
                ServerOp::ReauthSuccess { data: Some(2) },
            ]),
            |s| s.connected == 1 && s.auth_steps == 3 && s.reauthenticated == 1,
        ),
        (
            "server-v3-keepalive-will",
            server(vec![
                ServerOp::Connect {
                    spec: ConnectSpec {
                        version: 1,
                        resume: true,
                        keep_alive: 10,
                        will: Some(WillSpec {
                            delay: None,
                            ..will.clone()
                        }),
                        ..ConnectSpec::default()
                    },
                },
                accept(SessionChoice::Fresh),
                ServerOp::Subscribe {
                    id: 1,
                    filters: vec![FilterSpec {
                        filter: 1,
                        qos: 1,
                        ..FilterSpec::default()
                    }],
                    subscription_id: 0,
                },
                ServerOp::SubscribeAck {
                    id: IdRef::default(),
                    reasons: Vec::new(),
                },
                deliver(QoS::AtLeastOnce),
                ServerOp::PingReq,
                ServerOp::Advance {
                    time: seconds(16),
                    fire: true,
                },
                new_connection(),
                ServerOp::SessionTimers { index: 0 },
            ]),
            |s| s.connected == 1 && s.timed_out == 1 && s.session_events == 1,
        ),
        (
            "server-v5-will-delay-expiry",
            server(vec![
                ServerOp::Connect {
                    spec: ConnectSpec {
                        resume: true,
                        session_expiry: Some(10),
                        will: Some(will),
                        ..ConnectSpec::default()
                    },
                },
                accept(SessionChoice::Fresh),
                ServerOp::ConnectionLost,
                new_connection(),
                ServerOp::Advance {
                    time: seconds(6),
                    fire: false,
                },
                ServerOp::SessionTimers { index: 0 },
                ServerOp::Advance {
                    time: seconds(5),
                    fire: false,
                },
                ServerOp::SessionTimers { index: 0 },
            ]),
            |s| s.session_events == 2,
        ),
        (
            "server-v5-raw-stream",
            server(vec![
                ServerOp::Raw {
                    bytes: stream,
                    keep_partial: false,
                },
                accept(SessionChoice::Fresh),
                ServerOp::PublishAck {
                    id: IdRef::default(),
                    reason: 0,
                },
                ServerOp::Raw {
                    bytes: vec![0x00, 0x00],
                    keep_partial: false,
                },
            ]),
            |s| s.connected == 1 && s.decode_errors == 1,
        ),
    ])
}

fn client(setup: ClientSetup, ops: Vec<ClientOp>) -> Input {
    Input::Client { setup, ops }
}

fn connack() -> ClientOp {
    ClientOp::ConnAck {
        spec: ConnAckSpec::default(),
    }
}

fn client_seeds() -> Vec<(&'static str, Input, Expect)> {
    vec![
        (
            "client-v5-qos2-both-ways",
            client(
                ClientSetup::default(),
                vec![
                    connack(),
                    ClientOp::AppPublish {
                        message: message(QoS::ExactlyOnce),
                    },
                    ClientOp::PubRec { ack: recent() },
                    ClientOp::PubComp { ack: recent() },
                    ClientOp::Publish {
                        spec: publish(QoS::ExactlyOnce, 9),
                    },
                    ClientOp::PubRel { ack: recent() },
                    ClientOp::AppDisconnect {
                        reason: 0,
                        session_expiry: None,
                    },
                ],
            ),
            |s| s.connected == 1 && s.qos2_sent == 1,
        ),
        (
            "client-v5-reconnect-resume",
            client(
                ClientSetup {
                    resume: true,
                    session_expiry: 3600,
                    ..ClientSetup::default()
                },
                vec![
                    ClientOp::AppPublish {
                        message: message(QoS::AtLeastOnce),
                    },
                    ClientOp::AppPublish {
                        message: message(QoS::AtLeastOnce),
                    },
                    ClientOp::ConnAck {
                        spec: ConnAckSpec {
                            receive_maximum: 1,
                            ..ConnAckSpec::default()
                        },
                    },
                    ClientOp::ConnectionLost,
                    ClientOp::NewConnection { clean_start: false },
                    ClientOp::ConnAck {
                        spec: ConnAckSpec {
                            session_present: true,
                            receive_maximum: 1,
                            ..ConnAckSpec::default()
                        },
                    },
                    ClientOp::PubAck { ack: recent() },
                    ClientOp::PubAck { ack: recent() },
                ],
            ),
            |s| s.connections == 2 && s.connected == 2 && s.resent == 1,
        ),
        (
            "client-v5-auth-and-reauth",
            client(
                ClientSetup {
                    auth_method: 1,
                    auth_data: Some(3),
                    ..ClientSetup::default()
                },
                vec![
                    ClientOp::Auth {
                        spec: auth(R::ContinueAuthentication, 8),
                    },
                    ClientOp::AppAuthContinue { data: Some(8) },
                    ClientOp::ConnAck {
                        spec: ConnAckSpec {
                            auth_method: 1,
                            ..ConnAckSpec::default()
                        },
                    },
                    ClientOp::AppReauthenticate { data: Some(3) },
                    ClientOp::Auth {
                        spec: auth(R::ContinueAuthentication, 8),
                    },
                    ClientOp::AppAuthContinue { data: Some(8) },
                    ClientOp::Auth {
                        spec: auth(R::Success, 2),
                    },
                ],
            ),
            |s| s.connected == 1 && s.auth_steps == 2 && s.reauthenticated == 1,
        ),
        (
            "client-v3-keepalive",
            client(
                ClientSetup {
                    version: 1,
                    keep_alive: 30,
                    ..ClientSetup::default()
                },
                vec![
                    connack(),
                    ClientOp::AppSubscribe {
                        filters: vec![FilterSpec {
                            filter: 1,
                            qos: 2,
                            ..FilterSpec::default()
                        }],
                        subscription_id: 0,
                    },
                    ClientOp::SubAck {
                        id: IdRef::default(),
                        reasons: Vec::new(),
                    },
                    ClientOp::Advance {
                        time: seconds(30),
                        fire: true,
                    },
                    ClientOp::PingResp,
                    ClientOp::Advance {
                        time: seconds(30),
                        fire: true,
                    },
                    ClientOp::Advance {
                        time: seconds(30),
                        fire: true,
                    },
                ],
            ),
            |s| s.connected == 1 && s.timed_out == 1,
        ),
    ]
}

fn seeds() -> Result<Vec<(&'static str, Input, Expect)>, Error> {
    let mut seeds = server_seeds()?;
    seeds.extend(client_seeds());
    Ok(seeds)
}
