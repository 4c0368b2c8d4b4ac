//! Regressions found by the `session` fuzz target (`fuzz/fuzz_targets/session.rs`), each
//! replayed as the smallest scenario that showed it. Every packet goes through the codec as a
//! transport would carry it, so a packet the peer could not read fails the test.

mod common;

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use common::*;
use mqttd_proto::client::{ClientConfig, ClientConnection, Event as ClientEvent};
use mqttd_proto::codec::PacketReader;
use mqttd_proto::server::{Accept, Event, ServerConfig, ServerConnection, StateError};
use mqttd_proto::session::{Enqueued, QueueLimits, Session};
use mqttd_proto::{
    ConnAck, ConnAckProperties, Message, Packet, ProtocolVersion, QoS, ReasonCode as R, SubAck,
    Subscription, SubscriptionOptions,
};

const V5: ProtocolVersion = ProtocolVersion::V5;

// ---------------------------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------------------------

/// Feeds a client packet to the server through the codec.
fn to_server(server: &mut ServerConnection, now: Instant, version: ProtocolVersion, p: Packet) {
    let wire = encode(version, &p);
    let packet = read_one(&wire, server.version(), server.max_packet_size())
        .unwrap_or_else(|e| panic!("the server cannot read {p:?}: {e}"));
    server.handle_packet(now, packet);
}

/// A server connection that received `connect` and awaits the broker's answer.
fn connecting(now: Instant, connect: ConnectBuilder) -> ServerConnection {
    let version = connect.0.protocol;
    let mut server = ServerConnection::new(ServerConfig::default(), now);
    to_server(&mut server, now, version, connect.packet());
    match server.poll_event() {
        Some(Event::Connect(_)) => server,
        other => panic!("expected a Connect event, got {other:?}"),
    }
}

/// A server connection accepted with `session` (a fresh one if `None`), CONNACK drained.
fn connected(now: Instant, connect: ConnectBuilder, session: Option<Session>) -> ServerConnection {
    let client_id = connect.0.client_id.clone();
    let mut server = connecting(now, connect);
    let present = session.is_some();
    let session =
        session.unwrap_or_else(|| Session::new(client_id, u32::MAX, QueueLimits::default()));
    server
        .accept(now, Accept::new(session, present))
        .expect("a CONNECT is pending");
    let out = drain(&mut server, now, u32::MAX);
    assert!(
        matches!(out.packets.first(), Some(Packet::ConnAck(a)) if a.reason == R::Success),
        "{:?}",
        out.packets
    );
    server
}

/// SUBACK and UNSUBACK carried the broker's reason codes unchecked, so a code those packets may
/// not carry made a packet the client must refuse as malformed.
#[test]
fn server_sends_only_reason_codes_suback_and_unsuback_may_carry() {
    let clock = Clock::new();
    let now = clock.t0();
    let mut server = connected(now, ConnectBuilder::v5("c"), None);
    server
        .subscribe_ack(
            pid(1),
            vec![
                R::KeepAliveTimeout,
                R::NoMatchingSubscribers,
                R::GrantedQoS1,
            ],
        )
        .expect("connected");
    server
        .unsubscribe_ack(
            pid(2),
            vec![
                R::KeepAliveTimeout,
                R::NoSubscriptionExisted,
                R::GrantedQoS2,
            ],
        )
        .expect("connected");
    let out = drain(&mut server, now, u32::MAX);
    assert_eq!(
        out.packets,
        [
            Packet::SubAck(SubAck {
                packet_id: pid(1),
                properties: Default::default(),
                reasons: vec![R::UnspecifiedError, R::Success, R::GrantedQoS1],
            }),
            Packet::UnsubAck(mqttd_proto::UnsubAck {
                packet_id: pid(2),
                properties: Default::default(),
                reasons: vec![R::UnspecifiedError, R::NoSubscriptionExisted, R::Success],
            }),
        ]
    );

    // MQTT 3.1.1 has failure 0x80 and the granted QoS only.
    let mut server = connected(now, ConnectBuilder::v311("c"), None);
    server
        .subscribe_ack(pid(1), vec![R::NoMatchingSubscribers, R::NotAuthorized])
        .expect("connected");
    let out = drain(&mut server, now, u32::MAX);
    assert!(
        matches!(&out.packets[..], [Packet::SubAck(a)] if a.reasons == [R::Success, R::UnspecifiedError]),
        "{:?}",
        out.packets
    );
}

/// `auth_continue` during CONNECT sent AUTH to any client, even one that asked for no
/// enhanced authentication, and even over MQTT 3.1.1, which has no AUTH packet
/// [MQTT-4.12.0-6].
#[test]
fn server_sends_no_auth_to_a_client_without_an_authentication_method() {
    let clock = Clock::new();
    let now = clock.t0();
    for connect in [ConnectBuilder::v311("c"), ConnectBuilder::v5("c")] {
        let mut server = connecting(now, connect);
        assert_eq!(
            server.auth_continue(Some(bytes("challenge"))),
            Err(StateError::NoAuthenticationMethod)
        );
        assert!(drain(&mut server, now, u32::MAX).is_empty());
        // The attempt is still pending.
        let session = Session::new(client_id("c"), 0, QueueLimits::default());
        server
            .accept(now, Accept::new(session, false))
            .expect("still pending");
    }

    let mut server = connecting(now, ConnectBuilder::v5("c").auth("SCRAM-SHA-256", None));
    server
        .auth_continue(Some(bytes("challenge")))
        .expect("the client asked for it");
    let out = drain(&mut server, now, u32::MAX);
    assert!(
        matches!(&out.packets[..], [Packet::Auth(a)] if a.reason == R::ContinueAuthentication),
        "{:?}",
        out.packets
    );
}

/// A message in flight was resent on the next connection without the size check, so a client
/// that now announced a smaller maximum packet size got a packet larger than it
/// [MQTT-3.1.2-24]. It is discarded as if its flow completed [MQTT-3.1.2-25], and reported.
#[test]
fn server_discards_a_resumed_message_too_large_for_the_new_connection() {
    let clock = Clock::new();
    let now = clock.t0();
    let connect = ConnectBuilder::v5("c")
        .clean_start(false)
        .session_expiry(3600);
    let mut server = connected(now, connect.clone(), None);
    let big = "x".repeat(200);
    assert_eq!(
        server.deliver(now, delivery("a/b", QoS::AtLeastOnce, &big)),
        Enqueued::Sent
    );
    assert_eq!(
        server.deliver(now, delivery("a/b", QoS::AtLeastOnce, "small")),
        Enqueued::Sent
    );
    drain(&mut server, now, u32::MAX);
    server.connection_lost(now);
    let session = server.take_session().expect("a session after close");

    let later = clock.at(1);
    let mut server = connecting(later, connect.maximum_packet_size(100));
    server
        .accept(later, Accept::new(session, true))
        .expect("pending");
    let out = drain(&mut server, later, 100);
    match &out.packets[..] {
        [Packet::ConnAck(_), Packet::Publish(p)] => {
            assert_eq!((p.packet_id, p.dup), (Some(pid(2)), true));
        }
        other => panic!("expected CONNACK and the small message's resend, got {other:?}"),
    }
    assert!(
        matches!(
            &out.events[..],
            [Event::Delivered { packet_id, reason: R::PacketTooLarge, .. }] if *packet_id == pid(1)
        ),
        "{:?}",
        out.events
    );
    let session = server.session().expect("connected");
    assert_eq!(session.drops().too_large, 1);
    assert_eq!(
        session.in_flight().map(|(id, _)| id).collect::<Vec<_>>(),
        [pid(2)]
    );
}

// ---------------------------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------------------------

/// Everything the client transmitted, as the server decodes it.
fn from_client(client: &mut ClientConnection, now: Instant) -> Vec<Packet> {
    let mut packets = Vec::new();
    while let Some(packet) = client.poll_transmit(now) {
        let version = client.version();
        let wire = encode(version, &packet);
        let read_as = (!matches!(packet, Packet::Connect(_))).then_some(version);
        let decoded = read_one(&wire, read_as, u32::MAX)
            .unwrap_or_else(|e| panic!("the server cannot read {packet:?}: {e}"));
        packets.push(decoded);
    }
    packets
}

/// Feeds a server packet to the client through the codec.
fn to_client(client: &mut ClientConnection, now: Instant, packet: &Packet) {
    let mut buf = BytesMut::from(&encode(client.version(), packet)[..]);
    let decoded = PacketReader::new(client.max_packet_size())
        .read(&mut buf, Some(client.version()))
        .unwrap_or_else(|e| panic!("the client cannot read {packet:?}: {e}"))
        .expect("a whole packet");
    client.handle_packet(now, decoded);
}

fn connack(properties: ConnAckProperties) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present: false,
        reason: R::Success,
        properties,
    })
}

fn events(client: &mut ClientConnection) -> Vec<ClientEvent> {
    std::iter::from_fn(|| client.poll_event()).collect()
}

/// A client connection that sent CONNECT and got a successful CONNACK.
fn client_connected(now: Instant, config: ClientConfig) -> ClientConnection {
    let mut client = ClientConnection::new(config, None, now);
    from_client(&mut client, now);
    to_client(&mut client, now, &connack(ConnAckProperties::default()));
    assert!(client.is_connected());
    events(&mut client);
    client
}

/// Messages published before CONNACK went out at their own QoS and RETAIN flag whatever the
/// server announced, so a server with a lower maximum QoS or without retained messages had to
/// disconnect the client [MQTT-3.2.2-11, MQTT-3.2.2-14].
#[test]
fn client_sends_queued_messages_within_the_servers_limits() {
    let clock = Clock::new();
    let now = clock.t0();
    let mut client = ClientConnection::new(ClientConfig::new(client_id("c")), None, now);
    from_client(&mut client, now);
    let retained = Arc::new(Message::new(
        topic("a/b"),
        Bytes::from_static(b"x"),
        QoS::ExactlyOnce,
        true,
    ));
    assert_eq!(client.publish(now, retained), Ok(Enqueued::Queued));
    to_client(
        &mut client,
        now,
        &connack(ConnAckProperties {
            maximum_qos: Some(QoS::AtLeastOnce),
            retain_available: Some(false),
            ..ConnAckProperties::default()
        }),
    );
    match &from_client(&mut client, now)[..] {
        [Packet::Publish(p)] => assert_eq!((p.qos, p.retain), (QoS::AtLeastOnce, false)),
        other => panic!("expected one PUBLISH, got {other:?}"),
    }
}

/// An MQTT 3.1.1 client with a password and no user name sent a CONNECT every server must
/// refuse as malformed [MQTT-3.1.2-22]; the password is left out instead.
#[test]
fn mqtt3_client_leaves_out_a_password_without_user_name() {
    let clock = Clock::new();
    let now = clock.t0();
    for (version, sent) in [
        (ProtocolVersion::V3_1_1, None),
        (ProtocolVersion::V3_1, None),
        (V5, Some(bytes("secret"))),
    ] {
        let mut config = ClientConfig::new(client_id("c"));
        config.version = version;
        config.password = Some(bytes("secret"));
        let mut client = ClientConnection::new(config, None, now);
        match &from_client(&mut client, now)[..] {
            [Packet::Connect(c)] => assert_eq!(c.password, sent, "{version}"),
            other => panic!("expected CONNECT, got {other:?}"),
        }
    }
}

/// The application's DISCONNECT carried its reason code unchecked, and a session expiry even
/// when CONNECT asked for none, which the server must take as a protocol error (and then
/// publish the will) [MQTT-3.14.2-2].
#[test]
fn client_disconnect_carries_only_what_the_server_accepts() {
    let clock = Clock::new();
    let now = clock.t0();
    let mut client = client_connected(now, ClientConfig::new(client_id("c")));
    client.disconnect(now, R::PacketIdentifierNotFound, Some(600));
    match &from_client(&mut client, now)[..] {
        [Packet::Disconnect(d)] => {
            assert_eq!(d.reason, R::UnspecifiedError);
            assert_eq!(d.properties.session_expiry_interval, None);
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }

    // With a session expiry in CONNECT, a new one may be set.
    let mut config = ClientConfig::new(client_id("c"));
    config.session_expiry_interval = 60;
    let mut client = client_connected(now, config);
    client.disconnect(now, R::Success, Some(600));
    match &from_client(&mut client, now)[..] {
        [Packet::Disconnect(d)] => assert_eq!(d.properties.session_expiry_interval, Some(600)),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

/// PUBLISH took packet identifier 1 while SUBSCRIBE 1 still awaited its SUBACK: the two share
/// one identifier space [MQTT-2.2.1-3].
#[test]
fn client_publish_never_takes_a_pending_subscribe_identifier() {
    let clock = Clock::new();
    let now = clock.t0();
    let subscription = || {
        vec![Subscription {
            filter: filter("a/#"),
            options: SubscriptionOptions::default(),
        }]
    };
    let msg = || message("a/b", QoS::AtLeastOnce, "x");

    // Subscribed before CONNACK, published after it.
    let mut client = ClientConnection::new(ClientConfig::new(client_id("c")), None, now);
    let sub = client
        .subscribe(subscription(), Default::default())
        .expect("open");
    assert_eq!(client.publish(now, msg()), Ok(Enqueued::Queued));
    to_client(&mut client, now, &connack(ConnAckProperties::default()));
    let ids: Vec<_> = from_client(&mut client, now)
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => p.packet_id,
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 1);
    assert_ne!(ids[0], sub);

    // Both while connected; once SUBACK arrives the identifier is free again.
    let mut client = client_connected(now, ClientConfig::new(client_id("c")));
    let sub = client
        .subscribe(subscription(), Default::default())
        .expect("open");
    assert_eq!(client.publish(now, msg()), Ok(Enqueued::Sent));
    let sent = from_client(&mut client, now);
    assert!(
        matches!(&sent[..], [Packet::Subscribe(_), Packet::Publish(p)] if p.packet_id != Some(sub)),
        "{sent:?}"
    );
    to_client(
        &mut client,
        now,
        &Packet::SubAck(SubAck {
            packet_id: sub,
            properties: Default::default(),
            reasons: vec![R::Success],
        }),
    );
    let in_flight: Vec<_> = client
        .session()
        .expect("connected")
        .in_flight()
        .map(|(id, _)| id)
        .collect();
    assert!(!in_flight.contains(&sub), "{in_flight:?}");
}
