//! Unit tests of the connection core, driven by hand: packets in, bytes out, time passed in.

use super::*;
use crate::config::{Config, OfflineQos0};
use crate::hooks::Transport;
use crate::storage::MemoryStorage;
use mqttd_proto::TopicName;

fn delivery(qos: QoS) -> Delivery {
    let topic = TopicName::try_from("t").unwrap();
    Delivery::new(Arc::new(Message::new(topic, b"x".to_vec(), qos, false)))
}

fn peer() -> Peer {
    Peer::new(
        Transport::Tcp,
        ([127, 0, 0, 1], 1883).into(),
        Arc::from("test"),
    )
}

fn inner_with(config: Config) -> Arc<Inner> {
    Inner::for_tests(config, Arc::new(MemoryStorage::default()))
}

/// The QoS of what a persistent session's queue holds once its connection closed with
/// a QoS 0 and a QoS 1 message still in its mailbox.
async fn parked_after_close(offline_qos0: OfflineQos0) -> Vec<QoS> {
    let inner = inner_with(Config {
        offline_qos0,
        ..Config::default()
    });
    let now = Instant::now();
    let mut core = ConnectionCore::new(inner.clone(), peer(), now, Watermark::default());
    let id = ClientId::try_from("c").unwrap();
    let acquired = inner
        .acquire_session(now, &id, true, 3600, core.mailbox())
        .await;
    let handle = acquired.handle.clone();
    // Acquired for a connection that closed before CONNACK.
    core.session_acquired(now, acquired);
    assert!(handle.deliver(now, delivery(QoS::AtMostOnce), &inner));
    assert!(handle.deliver(now, delivery(QoS::AtLeastOnce), &inner));
    core.finish(now, SystemTime::UNIX_EPOCH);
    let slot = handle.slot.lock();
    let Slot::Offline { session, .. } = &*slot else {
        panic!("the session is not parked: {slot:?}");
    };
    session.queued().map(|d| d.qos).collect()
}

#[tokio::test]
async fn closing_parks_qos0_only_if_offline_qos0_is_queue() {
    assert_eq!(
        parked_after_close(OfflineQos0::Drop).await,
        [QoS::AtLeastOnce]
    );
    assert_eq!(
        parked_after_close(OfflineQos0::Queue).await,
        [QoS::AtMostOnce, QoS::AtLeastOnce]
    );
}

/// What every connection holds, idle or not, is paid per connection: the byte-stream
/// driver's future plus the core it points to stay within what the connection task took
/// before the core was split out (a 1,480-byte future on this toolchain, debug build), so that
/// memory per idle connection does not grow.
#[test]
fn an_idle_connection_holds_no_more_than_before() {
    fn future_size<F: std::future::Future>(_: &F) -> usize {
        size_of::<F>()
    }
    let core = size_of::<ConnectionCore>();
    // 512 until the watermark learnt which changes a storage failure lost (16 bytes more),
    // 528 until the client's details were kept once, the protocol machine's configuration
    // shared, the rarely used lists made one pointer each and what only setting up or
    // taking over a connection needs boxed together.
    assert!(core <= 336, "ConnectionCore is {core} bytes");
    let (stream, _client) = tokio::io::duplex(16);
    let serve = crate::drivers::stream::serve(inner_with(Config::default()), stream, peer());
    let size = future_size(&serve) + core;
    assert!(
        size <= 1488,
        "the connection future and its core are {size} bytes"
    );
    // What the TCP listener spawns, with its connection permit: the driver's future and the
    // permit, not the future twice (as an `async` block awaiting it would hold it).
    let (stream, _client) = tokio::io::duplex(16);
    let permit = Some(Arc::new(()));
    let now = crate::clock::now();
    let holding = crate::drivers::stream::serve_holding(
        inner_with(Config::default()),
        stream,
        peer(),
        now,
        permit,
    );
    let spawned = future_size(&holding);
    let alone = future_size(&serve);
    assert!(
        spawned <= alone + 32,
        "the spawned connection future is {spawned} bytes, the driver's {alone}"
    );
}

fn connect_packet(client_id: &str) -> Packet {
    Packet::Connect(Box::new(mqttd_proto::Connect {
        protocol: ProtocolVersion::V5,
        clean_start: true,
        keep_alive: 30,
        client_id: ClientId::try_from(client_id).unwrap(),
        will: None,
        username: None,
        password: None,
        properties: mqttd_proto::ConnectProperties::default(),
    }))
}

/// `delivery` arrives in the connection's mailbox, and the core handles it.
fn hand(core: &mut ConnectionCore, now: Instant, delivery: Delivery) {
    core.handle_inbox(
        now,
        Inbox {
            deliveries: VecDeque::from([delivery]),
            ..Inbox::default()
        },
    );
    core.process(now);
}

/// The packets in `stream`'s writable output, taken as the transport would.
fn written(core: &mut ConnectionCore, stream: StreamId) -> Vec<Packet> {
    let Some(output) = core.output(stream) else {
        return Vec::new();
    };
    let mut bytes = BytesMut::from(output.writable());
    let n = bytes.len();
    core.wrote(stream, n);
    let mut reader = PacketReader::new(1 << 20);
    let mut packets = Vec::new();
    while let Some(p) = reader.read(&mut bytes, Some(ProtocolVersion::V5)).unwrap() {
        packets.push(p);
    }
    packets
}

/// A core that received a clean MQTT 5 CONNECT from `client_id` and asks for its session.
fn connecting(
    inner: &Arc<Inner>,
    now: Instant,
    client_id: &str,
) -> (ConnectionCore, SessionRequest) {
    connecting_with(inner, now, connect_packet(client_id))
}

/// A core that received `connect` and asks for its session.
fn connecting_with(
    inner: &Arc<Inner>,
    now: Instant,
    connect: Packet,
) -> (ConnectionCore, SessionRequest) {
    let mut core = ConnectionCore::new(inner.clone(), peer(), now, Watermark::default());
    core.handle_packet(now, StreamId::CONTROL, connect);
    core.process(now);
    let Some(Request::AcquireSession(request)) = core.poll_request() else {
        panic!("CONNECT asks for the session");
    };
    (core, *request)
}

#[tokio::test]
async fn connack_waits_for_the_session_and_nothing_is_read_meanwhile() {
    let inner = inner_with(Config::default());
    let now = Instant::now();
    let (mut core, request) = connecting(&inner, now, "c");
    assert_eq!(request.client_id.as_str(), "c");
    assert!(core.is_waiting());
    assert!(
        !core.wants_read(StreamId::CONTROL),
        "nothing is read until it comes"
    );
    assert!(
        written(&mut core, StreamId::CONTROL).is_empty(),
        "no CONNACK yet"
    );

    let acquired = inner.acquire(now, &request, core.mailbox()).await;
    core.session_acquired(now, acquired);
    core.process(now);
    assert!(core.wants_read(StreamId::CONTROL));
    let out = written(&mut core, StreamId::CONTROL);
    assert!(
        matches!(&out[..], [Packet::ConnAck(ack)] if ack.reason == ReasonCode::Success),
        "{out:?}"
    );
    assert_eq!(inner.metrics.clients_connected.get(), 1);
}

#[tokio::test]
async fn a_malformed_packet_closes_the_connection_and_counts() {
    let inner = inner_with(Config::default());
    let now = Instant::now();
    let mut core = ConnectionCore::new(inner.clone(), peer(), now, Watermark::default());
    // A packet type that does not exist (0), with a valid length.
    let mut input = BytesMut::from(&[0x00u8, 0x00][..]);
    core.handle_input(now, StreamId::CONTROL, &mut input);
    core.process(now);
    assert!(core.is_closed());
    assert_eq!(inner.metrics.protocol_errors.get(), 1);
    assert!(
        !core.finish(now, SystemTime::UNIX_EPOCH),
        "the broker ended it: linger"
    );
}

/// A core that accepted a clean CONNECT from `client_id` and sent its CONNACK.
async fn connected(inner: &Arc<Inner>, now: Instant, client_id: &str) -> ConnectionCore {
    let (mut core, request) = connecting(inner, now, client_id);
    let acquired = inner.acquire(now, &request, core.mailbox()).await;
    core.session_acquired(now, acquired);
    core.process(now);
    let _ = written(&mut core, StreamId::CONTROL);
    core
}

#[tokio::test]
async fn a_data_stream_is_read_only_after_connack() {
    let inner = inner_with(Config::default());
    let now = Instant::now();
    let data = StreamId::new(4);
    let mut core = ConnectionCore::new(inner.clone(), peer(), now, Watermark::default());
    assert!(core.wants_read(StreamId::CONTROL));
    assert!(!core.wants_read(data), "nothing but CONNECT before CONNACK");
    core.handle_packet(now, StreamId::CONTROL, connect_packet("c"));
    core.process(now);
    let Some(Request::AcquireSession(request)) = core.poll_request() else {
        panic!("CONNECT asks for the session");
    };
    let acquired = inner.acquire(now, &request, core.mailbox()).await;
    core.session_acquired(now, acquired);
    core.process(now);
    assert!(core.wants_read(data));
}

#[tokio::test]
async fn a_malformed_packet_on_a_data_stream_resets_that_stream_only() {
    let inner = inner_with(Config::default());
    let now = Instant::now();
    let mut core = connected(&inner, now, "c").await;
    let (bad, good) = (StreamId::new(4), StreamId::new(8));
    // SUBSCRIBE on the good data stream: its SUBACK goes there.
    let subscribe = Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(1).unwrap(),
        properties: mqttd_proto::SubscribeProperties::default(),
        filters: vec![mqttd_proto::Subscription {
            filter: TopicFilter::try_from("t").unwrap(),
            options: mqttd_proto::SubscriptionOptions::default(),
        }],
    });
    core.handle_packet(now, good, subscribe);
    core.process(now);
    assert!(matches!(&written(&mut core, good)[..], [Packet::SubAck(_)]));
    // A packet type that does not exist (0), on the other data stream, after a partial one.
    let mut input = BytesMut::from(&[0x00u8, 0x00, 0x30][..]);
    core.handle_input(now, bad, &mut input);
    core.process(now);
    assert!(input.is_empty(), "what the reset stream held is dropped");
    assert_eq!(
        core.poll_reset(),
        Some((bad, ReasonCode::MalformedPacket)),
        "the driver is told to reset it with the reason as its code"
    );
    assert_eq!(core.poll_reset(), None);
    assert!(!core.is_closed(), "the connection goes on");
    assert!(core.output(bad).is_none(), "the stream is forgotten");
    assert_eq!(inner.metrics.protocol_errors.get(), 1);
    // The control stream and the other data stream go on.
    core.handle_packet(now, StreamId::CONTROL, Packet::PingReq);
    core.process(now);
    assert!(matches!(
        &written(&mut core, StreamId::CONTROL)[..],
        [Packet::PingResp]
    ));
    hand(&mut core, now, delivery(QoS::AtMostOnce));
    assert!(matches!(
        &written(&mut core, good)[..],
        [Packet::Publish(_)]
    ));
    // A malformed packet on the control stream still closes the connection.
    let mut input = BytesMut::from(&[0x00u8, 0x00][..]);
    core.handle_input(now, StreamId::CONTROL, &mut input);
    core.process(now);
    assert!(core.is_closed());
    assert_eq!(core.poll_reset(), None);
    assert_eq!(core.close_reason(), Some(ReasonCode::MalformedPacket));
    assert_eq!(inner.metrics.protocol_errors.get(), 2);
}

#[tokio::test]
async fn the_keep_alive_deadline_is_the_core_timeout_and_closes() {
    let inner = inner_with(Config::default());
    let start = Instant::now();
    let (mut core, request) = connecting(&inner, start, "k");
    let acquired = inner.acquire(start, &request, core.mailbox()).await;
    core.session_acquired(start, acquired);
    core.process(start);
    let _ = written(&mut core, StreamId::CONTROL);
    // 1.5 x the 30 s keep alive.
    let due = core.poll_timeout().unwrap();
    assert_eq!(due - start, Duration::from_secs(45));
    core.handle_timeout(due - Duration::from_millis(1));
    assert!(!core.is_closed());
    core.handle_timeout(due);
    core.process(due);
    assert!(core.is_closed());
    let out = written(&mut core, StreamId::CONTROL);
    assert!(
        matches!(&out[..], [Packet::Disconnect(d)] if d.reason == ReasonCode::KeepAliveTimeout),
        "{out:?}"
    );
}

/// The user name a core that received `connect` from `peer` goes on with, under `config`.
fn username_after_connect(config: Config, peer: Peer, connect: Packet) -> Option<MqttStr> {
    let inner = inner_with(config);
    let now = Instant::now();
    let mut core = ConnectionCore::new(inner, peer, now, Watermark::default());
    core.handle_packet(now, StreamId::CONTROL, connect);
    core.process(now);
    assert!(
        matches!(core.poll_request(), Some(Request::AcquireSession(_))),
        "CONNECT goes on to ask for its session, without a password check"
    );
    let Some(Waiting::Session(connecting)) = core.rare.as_ref().and_then(|r| r.waiting.as_ref())
    else {
        panic!("not waiting for the session");
    };
    connecting.client.username.clone()
}

fn connect_as(user: &str) -> Packet {
    let mut packet = connect_packet("c");
    if let Packet::Connect(connect) = &mut packet {
        connect.username = Some(MqttStr::try_from(user).unwrap());
    }
    packet
}

fn tls_peer(identity: Option<&str>) -> Peer {
    let mut peer = Peer::new(
        Transport::Tls,
        ([127, 0, 0, 1], 8883).into(),
        Arc::from("tls"),
    );
    peer.tls_identity = identity.map(Arc::from);
    peer
}

fn identity_as_username() -> Config {
    let mut config = Config {
        allow_anonymous: Some(true),
        ..Config::default()
    };
    config.tls.use_identity_as_username = true;
    config
}

#[test]
fn the_certificate_identity_replaces_the_connect_user_name() {
    let user = username_after_connect(
        identity_as_username(),
        tls_peer(Some("device-1")),
        connect_as("admin"),
    );
    assert_eq!(user.as_deref(), Some("device-1"));
}

#[test]
fn without_a_certificate_the_client_has_no_user_name() {
    let user = username_after_connect(identity_as_username(), tls_peer(None), connect_as("admin"));
    assert_eq!(user, None);
}

#[test]
fn the_identity_counts_only_when_configured_and_on_tls() {
    let tcp = username_after_connect(identity_as_username(), peer(), connect_as("admin"));
    assert_eq!(
        tcp.as_deref(),
        Some("admin"),
        "plain TCP keeps the CONNECT's user name"
    );
    let off = Config {
        allow_anonymous: Some(true),
        ..Config::default()
    };
    let kept = username_after_connect(off, tls_peer(Some("device-1")), connect_as("admin"));
    assert_eq!(
        kept.as_deref(),
        Some("admin"),
        "without use_identity_as_username"
    );
}

#[test]
fn a_certificate_client_cannot_add_scram_on_top() {
    let inner = inner_with(identity_as_username());
    let now = Instant::now();
    let mut core =
        ConnectionCore::new(inner, tls_peer(Some("device-1")), now, Watermark::default());
    let mut packet = connect_packet("c");
    if let Packet::Connect(connect) = &mut packet {
        connect.properties.authentication_method = Some(MqttStr::try_from(MECHANISM).unwrap());
    }
    core.handle_packet(now, StreamId::CONTROL, packet);
    core.process(now);
    assert!(core.poll_request().is_none());
    let packets = written(&mut core, StreamId::CONTROL);
    assert!(
        matches!(&packets[..], [Packet::ConnAck(ack)] if ack.reason == ReasonCode::BadAuthenticationMethod),
        "{packets:?}"
    );
}

/// A core that received an MQTT 5 CONNECT from `client_id` asking for a session that lasts
/// `expiry` seconds: the session it asks for, or the CONNACK that refused it.
fn connect_with_expiry(
    inner: &Arc<Inner>,
    now: Instant,
    client_id: &str,
    expiry: u32,
) -> (ConnectionCore, Result<SessionRequest, ReasonCode>) {
    let mut core = ConnectionCore::new(inner.clone(), peer(), now, Watermark::default());
    let Packet::Connect(mut connect) = connect_packet(client_id) else {
        unreachable!()
    };
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(expiry);
    core.handle_packet(now, StreamId::CONTROL, Packet::Connect(connect));
    core.process(now);
    if let Some(Request::AcquireSession(request)) = core.poll_request() {
        return (core, Ok(*request));
    }
    let refusal = written(&mut core, StreamId::CONTROL)
        .into_iter()
        .find_map(|p| match p {
            Packet::ConnAck(ack) => Some(ack.reason),
            _ => None,
        })
        .expect("CONNACK");
    (core, Err(refusal))
}

#[tokio::test]
async fn persistent_sessions_past_max_sessions_are_refused_with_quota_exceeded() {
    let inner = inner_with(Config {
        max_sessions: 2,
        ..Config::default()
    });
    let now = Instant::now();
    let mut cores = Vec::new();
    for id in ["a", "b"] {
        let (mut core, request) = connect_with_expiry(&inner, now, id, 3600);
        let acquired = inner.acquire(now, &request.unwrap(), core.mailbox()).await;
        core.session_acquired(now, acquired);
        cores.push(core);
    }
    let (_, refused) = connect_with_expiry(&inner, now, "c", 3600);
    assert_eq!(refused.err(), Some(ReasonCode::QuotaExceeded));
    let refusals = || {
        inner
            .metrics
            .render()
            .lines()
            .find(|l| l.starts_with("mqttd_limit_refusals_total{limit=\"sessions\"}"))
            .map(str::to_owned)
    };
    assert_eq!(
        refusals().as_deref(),
        Some("mqttd_limit_refusals_total{limit=\"sessions\"} 1")
    );
    // A session that ends with its connection takes no place; nor does resuming one held.
    let (_, clean) = connect_with_expiry(&inner, now, "d", 0);
    assert!(clean.is_ok());
    let (_, resumed) = connect_with_expiry(&inner, now, "a", 3600);
    assert!(resumed.is_ok());
    // A CONNECT abandoned while it waits for its session gives its place back...
    let a = ClientId::try_from("a").unwrap();
    let handle = inner.sessions.get(&a).map(|h| h.clone()).unwrap();
    inner.end_session(now, &handle, None);
    assert_eq!(inner.persistent_sessions.held(), 1);
    let (mut core, request) = connect_with_expiry(&inner, now, "e", 3600);
    assert!(request.is_ok());
    assert_eq!(inner.persistent_sessions.held(), 2);
    core.abandon(now, ReasonCode::ServerBusy);
    drop(core);
    assert_eq!(inner.persistent_sessions.held(), 1);
    // ...and one whose client left before CONNACK keeps it: the session is parked.
    let (mut core, request) = connect_with_expiry(&inner, now, "f", 3600);
    core.connection_lost(now);
    let acquired = inner.acquire(now, &request.unwrap(), core.mailbox()).await;
    core.session_acquired(now, acquired);
    core.finish(now, SystemTime::UNIX_EPOCH);
    assert_eq!(inner.persistent_sessions.held(), 2);
    let (_, refused) = connect_with_expiry(&inner, now, "g", 3600);
    assert_eq!(refused.err(), Some(ReasonCode::QuotaExceeded));
}

fn retained_publish(topic: &str, qos: QoS, id: u16) -> Packet {
    Packet::Publish(mqttd_proto::Publish {
        dup: false,
        qos,
        retain: true,
        topic: TopicName::try_from(topic).unwrap(),
        packet_id: PacketId::new(id),
        properties: mqttd_proto::PublishProperties::default(),
        payload: Bytes::from_static(b"x"),
    })
}

#[tokio::test]
async fn past_max_retained_messages_qos0_is_delivered_unretained_and_qos1_refused() {
    let inner = inner_with(Config {
        max_retained_messages: 1,
        persistence: false,
        ..Config::default()
    });
    let now = Instant::now();
    let mut core = connected(&inner, now, "c").await;
    let subscribe = Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(1).unwrap(),
        properties: mqttd_proto::SubscribeProperties::default(),
        filters: vec![mqttd_proto::Subscription {
            filter: TopicFilter::try_from("t/+").unwrap(),
            options: mqttd_proto::SubscriptionOptions::default(),
        }],
    });
    core.handle_packet(now, StreamId::CONTROL, subscribe);
    core.process(now);
    let _ = written(&mut core, StreamId::CONTROL);
    for (topic, qos, id) in [
        ("t/a", QoS::AtMostOnce, 0),
        ("t/b", QoS::AtMostOnce, 0),
        ("t/c", QoS::AtLeastOnce, 7),
    ] {
        core.handle_packet(now, StreamId::CONTROL, retained_publish(topic, qos, id));
    }
    core.process(now);
    // What was routed to the client itself waits in its mailbox.
    let inbox = core.mailbox().take();
    core.handle_inbox(now, inbox);
    core.process(now);
    let packets = written(&mut core, StreamId::CONTROL);
    let delivered: Vec<&str> = packets
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p.topic.as_str()),
            _ => None,
        })
        .collect();
    // Both QoS 0 messages are delivered; the QoS 1 one is refused whole.
    assert_eq!(delivered, ["t/a", "t/b"]);
    let acks: Vec<ReasonCode> = packets
        .iter()
        .filter_map(|p| match p {
            Packet::PubAck(a) => Some(a.reason),
            _ => None,
        })
        .collect();
    assert_eq!(acks, [ReasonCode::QuotaExceeded]);
    assert_eq!(inner.retained.len(), 1);
    assert!(inner
        .metrics
        .render()
        .contains("mqttd_limit_refusals_total{limit=\"retained_messages\"} 2"));
}

/// A QoS 2 PUBLISH to `t` with `id` as its packet identifier and payload.
fn publish_qos2(id: u16) -> Packet {
    Packet::Publish(mqttd_proto::Publish {
        dup: false,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: TopicName::try_from("t").unwrap(),
        packet_id: PacketId::new(id),
        properties: mqttd_proto::PublishProperties::default(),
        payload: Bytes::from(id.to_string()),
    })
}

/// Subscribes `core`'s client to `t` at `qos`.
fn subscribe_t(core: &mut ConnectionCore, now: Instant, qos: QoS) {
    let subscribe = Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(1).unwrap(),
        properties: mqttd_proto::SubscribeProperties::default(),
        filters: vec![mqttd_proto::Subscription {
            filter: TopicFilter::try_from("t").unwrap(),
            options: mqttd_proto::SubscriptionOptions {
                qos,
                ..mqttd_proto::SubscriptionOptions::default()
            },
        }],
    });
    core.handle_packet(now, StreamId::CONTROL, subscribe);
    core.process(now);
    assert!(matches!(
        &written(core, StreamId::CONTROL)[..],
        [Packet::SubAck(_)]
    ));
}

/// The packet identifiers of the PUBRECs the publisher was sent.
fn pubrecs(core: &mut ConnectionCore) -> Vec<u16> {
    written(core, StreamId::CONTROL)
        .into_iter()
        .map(|p| match p {
            Packet::PubRec(r) if r.reason == ReasonCode::Success => r.packet_id.get(),
            other => panic!("a publisher gets only PUBRECs here: {other:?}"),
        })
        .collect()
}

/// A subscriber's client reading and acknowledging (QoS 1) all it is sent, until nothing more
/// comes; returns the payloads, in order.
fn drain(core: &mut ConnectionCore, now: Instant) -> Vec<String> {
    let mut payloads = Vec::new();
    loop {
        let inbox = core.mailbox().take();
        core.handle_inbox(now, inbox);
        core.process(now);
        let mut got = false;
        for packet in written(core, StreamId::CONTROL) {
            let Packet::Publish(p) = packet else {
                panic!("a subscriber gets only PUBLISH here: {packet:?}");
            };
            got = true;
            payloads.push(String::from_utf8(p.payload.to_vec()).unwrap());
            if let Some(id) = p.packet_id {
                let ack = Packet::PubAck(mqttd_proto::PubResponse::success(id));
                core.handle_packet(now, StreamId::CONTROL, ack);
            }
        }
        core.process(now);
        if !got {
            return payloads;
        }
    }
}

/// A broker whose sessions take 2 queued messages and 1 in flight: a connection's mailbox
/// holds at most 3.
fn small_queues() -> Arc<Inner> {
    inner_with(Config {
        max_queued_messages: 2,
        max_inflight_messages: 1,
        ..Config::default()
    })
}

/// A QoS 2 publication that finds a subscriber's queue full is held whole, PUBREC and the
/// publisher's reading with it: not even a subscriber with room gets it until every one has
/// room; then it is routed once to each, and nothing is dropped.
#[tokio::test]
async fn a_qos2_publication_waits_whole_for_room_and_loses_nothing() {
    let inner = small_queues();
    let now = Instant::now();
    let mut slow = connected(&inner, now, "slow").await;
    subscribe_t(&mut slow, now, QoS::AtLeastOnce);
    let mut other = connected(&inner, now, "other").await;
    subscribe_t(&mut other, now, QoS::AtLeastOnce);
    let mut publisher = connected(&inner, now, "pub").await;

    for id in 1..=4 {
        publisher.handle_packet(now, StreamId::CONTROL, publish_qos2(id));
    }
    publisher.process(now);
    assert_eq!(pubrecs(&mut publisher), [1, 2, 3], "the fourth waits");
    assert!(
        !publisher.wants_read(StreamId::CONTROL),
        "reading is paused"
    );
    assert!(publisher.blocked_on().is_some());
    assert!(publisher.poll_timeout().is_some(), "it looks again");

    // One subscriber makes room; the other is still full: the fourth still waits, and went
    // nowhere meanwhile.
    assert_eq!(drain(&mut other, now), ["1", "2", "3"]);
    publisher.retry_blocked(now);
    publisher.process(now);
    assert!(pubrecs(&mut publisher).is_empty());
    assert!(
        other.mailbox().take().deliveries.is_empty(),
        "nothing routed"
    );

    // The slow one makes room: the fourth goes to both, once, and is acknowledged.
    assert_eq!(drain(&mut slow, now), ["1", "2", "3"]);
    publisher.retry_blocked(now);
    publisher.process(now);
    assert_eq!(pubrecs(&mut publisher), [4]);
    assert!(publisher.wants_read(StreamId::CONTROL));
    assert_eq!(drain(&mut slow, now), ["4"]);
    assert_eq!(drain(&mut other, now), ["4"]);
    assert_eq!(inner.metrics.messages_dropped.get(), 0);
}

/// What a held QoS 2 publication's stream read meanwhile is routed after it, in order.
#[tokio::test]
async fn publications_behind_a_held_qos2_one_follow_it_in_order() {
    let inner = small_queues();
    let now = Instant::now();
    let mut slow = connected(&inner, now, "slow").await;
    subscribe_t(&mut slow, now, QoS::ExactlyOnce);
    let mut publisher = connected(&inner, now, "pub").await;
    for id in 1..=6 {
        publisher.handle_packet(now, StreamId::CONTROL, publish_qos2(id));
    }
    publisher.process(now);
    assert_eq!(pubrecs(&mut publisher), [1, 2, 3]);
    let mut received = Vec::new();
    // Each delivery takes two rounds (PUBLISH, then PUBREL) through a window of one.
    for _ in 0..20 {
        // The subscriber's client completes each QoS 2 delivery.
        let inbox = slow.mailbox().take();
        slow.handle_inbox(now, inbox);
        slow.process(now);
        for packet in written(&mut slow, StreamId::CONTROL) {
            match packet {
                Packet::Publish(p) => {
                    received.push(String::from_utf8(p.payload.to_vec()).unwrap());
                    let id = p.packet_id.unwrap();
                    let rec = Packet::PubRec(mqttd_proto::PubResponse::success(id));
                    slow.handle_packet(now, StreamId::CONTROL, rec);
                }
                Packet::PubRel(r) => {
                    let comp = Packet::PubComp(mqttd_proto::PubResponse::success(r.packet_id));
                    slow.handle_packet(now, StreamId::CONTROL, comp);
                }
                other => panic!("{other:?}"),
            }
        }
        slow.process(now);
        publisher.retry_blocked(now);
        publisher.process(now);
        let _ = pubrecs(&mut publisher);
    }
    assert_eq!(received, ["1", "2", "3", "4", "5", "6"]);
    assert!(publisher.blocked_on().is_none());
    assert_eq!(inner.metrics.messages_dropped.get(), 0);
}

/// A subscriber that makes no progress holds a QoS 2 publisher only for
/// [`BACKPRESSURE_WAIT`], as for QoS 1: then its copy is dropped and counted, the publication
/// acknowledged, and the session marked stalled.
#[tokio::test]
async fn a_stalled_subscriber_holds_a_qos2_publisher_only_for_the_wait() {
    let inner = small_queues();
    let start = Instant::now();
    let mut stalled = connected(&inner, start, "stalled").await;
    subscribe_t(&mut stalled, start, QoS::AtLeastOnce);
    let mut publisher = connected(&inner, start, "pub").await;
    for id in 1..=4 {
        publisher.handle_packet(start, StreamId::CONTROL, publish_qos2(id));
    }
    publisher.process(start);
    assert_eq!(pubrecs(&mut publisher), [1, 2, 3]);

    let soon = start + BACKPRESSURE_WAIT / 2;
    publisher.handle_timeout(soon);
    publisher.process(soon);
    assert!(pubrecs(&mut publisher).is_empty(), "still waiting");
    assert_eq!(inner.metrics.messages_dropped.get(), 0);

    let late = start + BACKPRESSURE_WAIT;
    publisher.handle_timeout(late);
    publisher.process(late);
    assert_eq!(pubrecs(&mut publisher), [4]);
    assert_eq!(inner.metrics.messages_dropped.get(), 1);
    let handle = publisher.blocked_on();
    assert!(handle.is_none(), "nothing waits");
    assert!(publisher.wants_read(StreamId::CONTROL));
}

/// A delivery of `len` payload bytes to `topic`.
fn delivery_to(topic: &str, len: usize, qos: QoS) -> Delivery {
    let topic = TopicName::try_from(topic).unwrap();
    Delivery::new(Arc::new(Message::new(topic, vec![b'x'; len], qos, false)))
}

/// A SUBSCRIBE to `filter` on `stream`, answered there.
fn subscribe_on(core: &mut ConnectionCore, now: Instant, stream: StreamId, filter: &str) {
    let subscribe = Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(1).unwrap(),
        properties: mqttd_proto::SubscribeProperties::default(),
        filters: vec![mqttd_proto::Subscription {
            filter: TopicFilter::try_from(filter).unwrap(),
            options: mqttd_proto::SubscriptionOptions::default(),
        }],
    });
    core.handle_packet(now, stream, subscribe);
    core.process(now);
    assert!(matches!(&written(core, stream)[..], [Packet::SubAck(_)]));
}

/// A QUIC client that stops reading one data stream while it keeps using another: what moves
/// on the live stream is no progress for the publishers waiting on the stalled one, so a
/// session marked stalled stays so (what is routed to it is dropped instead of holding its
/// publishers again after every live write), until the stalled stream itself moves.
#[tokio::test]
async fn a_live_data_stream_does_not_make_a_stalled_one_look_busy() {
    let inner = inner_with(Config::default());
    let now = Instant::now();
    let mut core = connected(&inner, now, "c").await;
    let (stalled, live) = (StreamId::new(4), StreamId::new(8));
    subscribe_on(&mut core, now, stalled, "stalled");
    subscribe_on(&mut core, now, live, "live");
    // The stalled stream's output backs up: nothing of it is written.
    for _ in 0..3 {
        hand(
            &mut core,
            now,
            delivery_to("stalled", 128 * 1024, QoS::AtMostOnce),
        );
    }
    assert!(!core.wants_read(stalled), "backed up");
    let handle = core.handle.clone().unwrap();
    assert!(handle.congested.load(Ordering::Relaxed));
    // A publisher gave up waiting for it.
    update_flag(&handle.stalled, true);
    let progress = handle.progress.load(Ordering::Relaxed);
    // The live stream gets a delivery, which the client reads and acknowledges.
    hand(&mut core, now, delivery_to("live", 10, QoS::AtLeastOnce));
    let [Packet::Publish(p)] = &written(&mut core, live)[..] else {
        panic!("the live stream gets its message");
    };
    let ack = mqttd_proto::PubResponse::success(p.packet_id.unwrap());
    core.handle_packet(now, live, Packet::PubAck(ack));
    core.process(now);
    assert!(handle.stalled.load(Ordering::Relaxed), "still stalled");
    assert_eq!(
        handle.progress.load(Ordering::Relaxed),
        progress,
        "no progress"
    );
    // The stalled stream moves: it is not stalled any more.
    let _ = written(&mut core, stalled);
    assert!(!handle.stalled.load(Ordering::Relaxed));
}

/// What the admin API reads of a connection, and its kick: the snapshot shows the client as
/// its CONNECT settled it, with its counters; a kick comes out as DISCONNECT 0x98, and the
/// clean session is gone once the connection finished.
#[tokio::test]
async fn the_admin_view_shows_a_connection_and_a_kick_disconnects_it_with_0x98() {
    use crate::broker::{Kick, SessionState};
    let inner = inner_with(Config::default());
    let now = Instant::now();
    let id = ClientId::try_from("watched").unwrap();
    let (mut core, request) = connecting(&inner, now, "watched");
    let acquired = inner.acquire(now, &request, core.mailbox()).await;
    // Before CONNACK the session is there, but nobody is connected to kick.
    assert_eq!(inner.kick(&id), Kick::NotConnected);
    core.session_acquired(now, acquired);
    core.process(now);
    let _ = written(&mut core, StreamId::CONTROL);

    let view = inner.session_view(&id).expect("the session");
    assert!(matches!(view.state, SessionState::Online(_)));
    let conn = view.conn().expect("connected");
    assert_eq!((conn.keep_alive, conn.clean_start), (30, true));
    assert_eq!(conn.client.peer.transport, Transport::Tcp);
    let stats = view.stats().expect("counters");
    assert!(stats.bytes_out.load(Ordering::Relaxed) > 0, "the CONNACK");
    assert_eq!(inner.session_views().len(), 1);

    assert_eq!(inner.kick(&id), Kick::Asked);
    core.handle_inbox(now, core.mailbox().take());
    core.process(now);
    let out = written(&mut core, StreamId::CONTROL);
    assert!(
        matches!(&out[..], [Packet::Disconnect(d)] if d.reason == ReasonCode::AdministrativeAction),
        "{out:?}"
    );
    assert!(core.is_closed());
    core.finish(now, SystemTime::UNIX_EPOCH);
    assert!(inner.session_view(&id).is_none());
    assert_eq!(inner.kick(&id), Kick::Unknown);
}

/// The admin API's listener figures count a connection that ends once: live, then in the
/// listener's totals; never in both (a listing whose views predate the end) nor in neither
/// (its counters fold before it leaves the live view).
#[tokio::test]
async fn a_listener_counts_a_connection_that_ends_once() {
    let inner = inner_with(Config::default());
    let now = Instant::now();
    let mut core = connected(&inner, now, "leaving").await;
    let of = |listener: &str, views: &[crate::broker::SessionView]| {
        let figures = inner.listener_figures(views);
        figures.get(listener).copied().unwrap_or_default()
    };
    let before_end = inner.session_views();
    let (live, clients) = of("test", &before_end);
    assert_eq!(clients, 1);
    assert!(live.bytes_out > 0, "the CONNACK");

    core.connection_lost(now);
    core.process(now);
    core.finish(now, SystemTime::UNIX_EPOCH);
    assert!(inner.session_views().is_empty());
    assert_eq!(of("test", &inner.session_views()), (live, 0));
    // Views taken before the end, totals read after it: the connection folded, so its
    // counters are in the totals only.
    assert_eq!(of("test", &before_end), (live, 0));
    // Another listener's figures have none of it.
    assert_eq!(of("other", &before_end).0.bytes_out, 0);
}

/// A connection is idle (and may park without a task) only with nothing to do but wait for
/// input, mail or its timer: not before CONNACK, not with output left, not while a request
/// is outstanding, and no longer once closed.
#[tokio::test]
async fn idle_means_nothing_to_do_but_wait() {
    let inner = inner_with(Config::default());
    let now = Instant::now();
    let (mut core, request) = connecting(&inner, now, "c");
    assert!(!core.is_idle(), "waiting for its session");
    let acquired = inner.acquire(now, &request, core.mailbox()).await;
    core.session_acquired(now, acquired);
    core.process(now);
    assert!(!core.is_idle(), "CONNACK not written yet");
    let _ = written(&mut core, StreamId::CONTROL);
    assert!(core.is_idle(), "connected, nothing left");

    // A delivery: idle again once it is written, even with its PUBACK still to come.
    hand(&mut core, now, delivery(QoS::AtLeastOnce));
    assert!(!core.is_idle(), "a delivery to write");
    let out = written(&mut core, StreamId::CONTROL);
    assert!(matches!(&out[..], [Packet::Publish(_)]), "{out:?}");
    assert!(core.is_idle(), "in flight, waiting for its PUBACK");

    core.handle_packet(now, StreamId::CONTROL, Packet::PingReq);
    core.process(now);
    assert!(!core.is_idle(), "PINGRESP to write");
    let _ = written(&mut core, StreamId::CONTROL);
    assert!(core.is_idle());

    core.shutdown(now);
    core.process(now);
    assert!(!core.is_idle(), "closed");
}

/// An idle connection with nothing going on parks in its smallest form and comes back as it
/// was: its keep alive deadline, its session (a kick finds it and ends it with 0x98); one with
/// a message in flight parks whole.
#[tokio::test]
async fn an_idle_core_parks_small_and_comes_back_the_same() {
    use crate::broker::Kick;
    let inner = inner_with(Config::default());
    let now = Instant::now();
    let mut core = Box::new(connected(&inner, now, "p").await);
    let due = core.poll_timeout();
    assert!(due.is_some());

    // In flight to the client: parked whole.
    hand(&mut core, now, delivery(QoS::AtLeastOnce));
    let _ = written(&mut core, StreamId::CONTROL);
    let parked = core.park();
    assert!(matches!(parked, ParkedCore::Whole(_)));
    let mut core = parked.unpark(&inner);
    let id = PacketId::new(1).unwrap();
    let ack = Packet::PubAck(mqttd_proto::PubResponse::success(id));
    core.handle_packet(now, StreamId::CONTROL, ack);
    core.process(now);
    assert!(core.is_idle());

    let parked = core.park();
    assert!(matches!(parked, ParkedCore::Idle(_)), "nothing going on");
    assert_eq!(parked.poll_timeout(), due);
    let mut core = parked.unpark(&inner);
    assert_eq!(core.poll_timeout(), due);
    assert!(core.is_idle());

    let id = ClientId::try_from("p").unwrap();
    assert_eq!(inner.kick(&id), Kick::Asked);
    core.handle_inbox(now, core.mailbox().take());
    core.process(now);
    let out = written(&mut core, StreamId::CONTROL);
    assert!(
        matches!(&out[..], [Packet::Disconnect(d)] if d.reason == ReasonCode::AdministrativeAction),
        "{out:?}"
    );
}

/// What a parked idle connection keeps instead of its core and the protocol machine's state
/// (`ConnectionCore` and `Established`, two allocations of 320 and 544 bytes): one of 296
/// bytes on this toolchain.
#[test]
fn an_idle_core_is_small() {
    let size = size_of::<IdleCore>();
    assert!(size <= 304, "IdleCore is {size} bytes");
}

/// Another node of the cluster took the session while a PUBREC from the client was read but
/// not yet answered: the PUBREL the protocol core queued for it is not sent, only the
/// DISCONNECT (0x8E), and the node is told the connection stopped serving the session.
#[tokio::test]
async fn a_session_taken_by_another_node_answers_nothing_read_before() {
    let inner = inner_with(Config::default());
    let now = Instant::now();
    let mut core = connected(&inner, now, "moving").await;
    hand(&mut core, now, delivery(QoS::ExactlyOnce));
    let [Packet::Publish(p)] = &written(&mut core, StreamId::CONTROL)[..] else {
        panic!("the message goes out");
    };
    let rec = mqttd_proto::PubResponse::success(p.packet_id.unwrap());
    core.handle_packet(now, StreamId::CONTROL, Packet::PubRec(rec));
    // The takeover arrives before the PUBREC's answer is encoded.
    let (tx, _session) = tokio::sync::oneshot::channel();
    let (stopped, mut told) = tokio::sync::oneshot::channel();
    core.mailbox().take_over_as(SessionReply(tx), Some(stopped));
    core.handle_inbox(now, core.mailbox().take());
    core.process(now);
    let out = written(&mut core, StreamId::CONTROL);
    assert!(
        matches!(&out[..], [Packet::Disconnect(d)] if d.reason == ReasonCode::SessionTakenOver),
        "{out:?}"
    );
    assert!(told.try_recv().is_ok(), "the node is told");
    // Nothing follows, whatever comes next.
    hand(&mut core, now, delivery(QoS::AtLeastOnce));
    assert!(written(&mut core, StreamId::CONTROL).is_empty());
}

/// A core that accepted a CONNECT from `kept` for a session that outlives it (expiry 60 s)
/// and sent its CONNACK.
async fn connected_persistent(inner: &Arc<Inner>, now: Instant) -> ConnectionCore {
    let mut connect = connect_packet("kept");
    if let Packet::Connect(c) = &mut connect {
        c.properties.session_expiry_interval = Some(60);
    }
    let (mut core, request) = connecting_with(inner, now, connect);
    let acquired = inner.acquire(now, &request, core.mailbox()).await;
    core.session_acquired(now, acquired);
    core.process(now);
    let out = written(&mut core, StreamId::CONTROL);
    assert!(matches!(&out[..], [Packet::ConnAck(_)]), "{out:?}");
    core
}

/// A storage that keeps nothing, but has every PUBLISH to a persistent session wait for
/// `fence` (change 1 at first, as a cluster has it wait for a confirmation that the session
/// is still the node's), which is durable once the watermark says so.
struct Fenced {
    watermark: tokio::sync::watch::Sender<Watermark>,
    fence: std::sync::Mutex<crate::storage::Fence>,
}

impl Default for Fenced {
    fn default() -> Self {
        Self {
            watermark: tokio::sync::watch::Sender::default(),
            fence: std::sync::Mutex::new(crate::storage::Fence {
                ticket: Ticket::new(1),
                until: None,
            }),
        }
    }
}

impl crate::storage::Storage for Fenced {
    fn recover(&self) -> Result<crate::storage::Recovered, crate::storage::StorageError> {
        Ok(crate::storage::Recovered::default())
    }
    fn retain(&self, _: &Arc<Message>) -> Ticket {
        Ticket::NONE
    }
    fn save_session(&self, _: &crate::storage::SessionRecord) -> Ticket {
        Ticket::NONE
    }
    fn remove_session(&self, _: &ClientId) -> Ticket {
        Ticket::NONE
    }
    fn remove_messages(&self, _: &ClientId) -> Ticket {
        Ticket::NONE
    }
    fn store_delivery(&self, _: &ClientId, _: &Delivery) -> Ticket {
        Ticket::NONE
    }
    fn delivery_flow(&self, _: &ClientId, _: u64, _: PacketId, _: OutboundState) -> Ticket {
        Ticket::NONE
    }
    fn delivery_done(&self, _: &ClientId, _: &Delivery) -> Ticket {
        Ticket::NONE
    }
    fn pending_release(&self, _: &ClientId, _: PacketId, _: bool) -> Ticket {
        Ticket::NONE
    }
    fn delivery_fence(&self, _: &ClientId) -> crate::storage::Fence {
        *self.fence.lock().unwrap()
    }
    fn watermark(&self) -> tokio::sync::watch::Receiver<Watermark> {
        self.watermark.subscribe()
    }
}

/// A PUBLISH to a persistent session leaves only once what the storage fences it with is
/// durable (in a cluster: a confirmation that the session is still this node's); a clean
/// session's does not wait.
#[tokio::test]
async fn a_publish_to_a_persistent_session_waits_for_its_fence() {
    let storage = Arc::new(Fenced::default());
    let inner = Inner::for_tests(Config::default(), storage.clone());
    let now = Instant::now();
    let mut clean = connected(&inner, now, "clean").await;
    hand(&mut clean, now, delivery(QoS::AtLeastOnce));
    let out = written(&mut clean, StreamId::CONTROL);
    assert!(matches!(&out[..], [Packet::Publish(_)]), "{out:?}");

    let mut core = connected_persistent(&inner, now).await;
    hand(&mut core, now, delivery(QoS::AtLeastOnce));
    hand(&mut core, now, delivery(QoS::AtMostOnce));
    assert!(
        written(&mut core, StreamId::CONTROL).is_empty(),
        "held until the fence is durable"
    );
    let durable = Watermark::new(1, false);
    storage.watermark.send_replace(durable);
    core.handle_watermark(now, durable);
    let out = written(&mut core, StreamId::CONTROL);
    assert!(
        matches!(&out[..], [Packet::Publish(_), Packet::Publish(_)]),
        "{out:?}"
    );
}

/// A fenced PUBLISH released but not written by its fence's deadline (the process was
/// paused in between, or the client read slowly) waits for a new fence; the driver is woken
/// for the deadline.
#[tokio::test]
async fn a_publish_not_written_by_its_fences_deadline_waits_for_another() {
    let storage = Arc::new(Fenced::default());
    let inner = Inner::for_tests(Config::default(), storage.clone());
    let now = Instant::now();
    let until = now + Duration::from_secs(2);
    *storage.fence.lock().unwrap() = crate::storage::Fence {
        ticket: Ticket::new(1),
        until: Some(until),
    };
    let mut core = connected_persistent(&inner, now).await;
    hand(&mut core, now, delivery(QoS::AtLeastOnce));
    assert!(core.poll_timeout().is_some_and(|t| t <= until));
    let durable = Watermark::new(1, false);
    storage.watermark.send_replace(durable);
    core.handle_watermark(now, durable);
    let released = core
        .output(StreamId::CONTROL)
        .map_or(0, |o| o.writable().len());
    assert!(released > 0, "released by the first fence");
    // Not written by the deadline: held again, for a new fence.
    let later = until + Duration::from_millis(1);
    *storage.fence.lock().unwrap() = crate::storage::Fence {
        ticket: Ticket::new(2),
        until: Some(later + Duration::from_secs(2)),
    };
    core.process(later);
    assert!(
        written(&mut core, StreamId::CONTROL).is_empty(),
        "held for the new fence"
    );
    let durable = Watermark::new(2, false);
    storage.watermark.send_replace(durable);
    core.handle_watermark(later, durable);
    let out = written(&mut core, StreamId::CONTROL);
    assert!(matches!(&out[..], [Packet::Publish(_)]), "{out:?}");
    assert!(core
        .poll_timeout()
        .is_none_or(|t| t > later + Duration::from_secs(1)));
}

/// A connection handing its session over when another node takes the session (its mailbox
/// told `abandon_output`) drops what it holds back for storage: once the holds are let go,
/// its last words send none of it.
#[tokio::test]
async fn a_connection_whose_session_left_while_it_moved_sends_nothing_held() {
    let storage = Arc::new(Fenced::default());
    let inner = Inner::for_tests(Config::default(), storage.clone());
    let now = Instant::now();
    let mut core = connected_persistent(&inner, now).await;
    hand(&mut core, now, delivery(QoS::ExactlyOnce));
    assert!(written(&mut core, StreamId::CONTROL).is_empty(), "held");
    core.mailbox().abandon_output();
    let durable = Watermark::new(1, false);
    core.release_output(durable);
    assert!(
        written(&mut core, StreamId::CONTROL).is_empty(),
        "cut, not released"
    );
    core.handle_watermark(now, durable);
    hand(&mut core, now, delivery(QoS::AtLeastOnce));
    assert!(written(&mut core, StreamId::CONTROL).is_empty());
}

/// A CONNECT that resumes the session of `kept` (expiry 60 s), asking for it.
fn resuming(inner: &Arc<Inner>, now: Instant) -> (ConnectionCore, SessionRequest) {
    let mut connect = connect_packet("kept");
    if let Packet::Connect(c) = &mut connect {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(60);
    }
    connecting_with(inner, now, connect)
}

/// The connection holding a session answers a takeover only after the connection that asked
/// gave up waiting (its process was paused past the wait; in a cluster lab run a session was
/// lost so): that one is refused with 0x89, and the session, with its message in flight,
/// stays for the client's next CONNECT.
#[tokio::test(start_paused = true)]
async fn a_takeover_answered_too_late_loses_nothing() {
    let inner = inner_with(Config::default());
    let now = Instant::now();
    let mut old = connected_persistent(&inner, now).await;
    hand(&mut old, now, delivery(QoS::AtLeastOnce));
    assert!(matches!(
        &written(&mut old, StreamId::CONTROL)[..],
        [Packet::Publish(_)]
    ));
    // Nothing answers while the new connection waits (the clock moves on by itself).
    let (_new, request) = resuming(&inner, now);
    let refused = inner.acquire(now, &request, _new.mailbox()).await;
    assert_eq!(refused.refused, Some(ReasonCode::ServerBusy));
    assert!(!refused.present);
    // The old connection answers late, and closes.
    old.handle_inbox(now, old.mailbox().take());
    old.process(now);
    old.finish(now, SystemTime::UNIX_EPOCH);
    // The client connects again and gets its session, with the message to send again.
    let (_again, request) = resuming(&inner, now);
    let acquired = inner.acquire(now, &request, _again.mailbox()).await;
    assert_eq!(acquired.refused, None);
    assert!(acquired.present, "the session was lost");
    assert_eq!(acquired.session.in_flight().count(), 1);
}
