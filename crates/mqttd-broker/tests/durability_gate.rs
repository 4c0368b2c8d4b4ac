//! Persist, then acknowledge: every packet that depends on a change to durable state (PUBACK,
//! PUBREC, PUBREL, PUBCOMP, SUBACK, CONNACK, a PUBLISH of a stored message) stays with the broker
//! until the storage's watermark passes the change, and goes out once it does.
//!
//! The broker runs with a storage whose watermark the test holds and releases, and clients speak
//! raw MQTT 5 so that each packet is seen on its own.
//!
//! "Does not arrive while held" is checked after a fence: once the storage saw the change the
//! packet depends on, the same client sends a SUBSCRIBE and the test waits until the storage saw
//! that too. The connection writes pending output before it reads the next packet, so by then a
//! packet that was not held back has been written to the socket; only a short wait for the
//! loopback delivery remains. Every test then releases the watermark and sees the packet arrive,
//! so none can pass because the packet was never produced.
//!
//! When storage fails, nothing more that depends on it is acknowledged: connections waiting for
//! it close with DISCONNECT 0x80, and the rest of the broker goes on.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mqttd_broker::{Broker, Config, ListenerKind};
use mqttd_proto::codec::PacketReader;
use mqttd_proto::{
    ClientId, Connect, ConnectProperties, Packet, PacketId, ProtocolVersion, PubResponse, Publish,
    PublishProperties, QoS, ReasonCode, Subscribe, SubscribeProperties, Subscription,
    SubscriptionOptions, TopicFilter, TopicName,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

mod common;
use common::{RecordingStorage, WAIT};

/// After the fence, how long a packet that was written (not held) gets to cross the loopback.
const SETTLE: Duration = Duration::from_millis(200);

async fn start() -> (Broker, SocketAddr, RecordingStorage, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let storage = RecordingStorage::new();
    let mut config = Config::default();
    config.listen = vec!["tcp://127.0.0.1:0".into()];
    config.data_dir = dir.path().to_owned();
    let broker = Broker::builder(config)
        .storage(storage.clone())
        .start()
        .await
        .unwrap();
    let addr = broker.addr(ListenerKind::Tcp).unwrap();
    (broker, addr, storage, dir)
}

fn pid(n: u16) -> PacketId {
    PacketId::new(n).unwrap()
}

/// An MQTT 5 client that sends and receives single packets.
struct Raw {
    id: String,
    stream: TcpStream,
    rbuf: BytesMut,
    reader: PacketReader,
    fences: u16,
}

impl Raw {
    /// Sends CONNECT (a session that outlives the connection if `persistent`) without waiting
    /// for CONNACK.
    async fn start_connect(addr: SocketAddr, id: &str, persistent: bool) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut raw = Self {
            id: id.to_owned(),
            stream,
            rbuf: BytesMut::new(),
            reader: PacketReader::new(u32::MAX),
            fences: 0,
        };
        raw.send(Packet::Connect(Box::new(Connect {
            protocol: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 0,
            client_id: ClientId::try_from(id).unwrap(),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties {
                session_expiry_interval: persistent.then_some(3600),
                ..ConnectProperties::default()
            },
        })))
        .await;
        raw
    }

    /// Connects and waits for a successful CONNACK.
    async fn connect(addr: SocketAddr, id: &str, persistent: bool) -> Self {
        let mut raw = Self::start_connect(addr, id, persistent).await;
        match raw.recv().await {
            Some(Packet::ConnAck(ack)) => assert_eq!(ack.reason, ReasonCode::Success),
            other => panic!("{id}: expected CONNACK, got {other:?}"),
        }
        raw
    }

    async fn send(&mut self, packet: Packet) {
        let mut buf = BytesMut::new();
        packet.encode(ProtocolVersion::V5, &mut buf).unwrap();
        self.stream.write_all(&buf).await.unwrap();
    }

    /// The next packet, or `None` once the broker closed the connection.
    async fn recv(&mut self) -> Option<Packet> {
        timeout(WAIT, self.next())
            .await
            .unwrap_or_else(|_| panic!("{}: no packet and no close in {WAIT:?}", self.id))
    }

    /// Cancel-safe: a partly read packet stays in the buffer.
    async fn next(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = self
                .reader
                .read(&mut self.rbuf, Some(ProtocolVersion::V5))
                .unwrap()
            {
                return Some(p);
            }
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    async fn subscribe(&mut self, id: u16, filter: &str, qos: QoS) {
        self.send(Packet::Subscribe(Subscribe {
            packet_id: pid(id),
            properties: SubscribeProperties::default(),
            filters: vec![Subscription {
                filter: TopicFilter::try_from(filter).unwrap(),
                options: SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                },
            }],
        }))
        .await;
    }

    async fn publish(&mut self, id: Option<u16>, topic: &str, payload: &str, qos: QoS) {
        self.publish_retained(id, topic, payload, qos, false).await;
    }

    async fn publish_retained(
        &mut self,
        id: Option<u16>,
        topic: &str,
        payload: &str,
        qos: QoS,
        retain: bool,
    ) {
        self.send(Packet::Publish(Publish {
            dup: false,
            qos,
            retain,
            topic: TopicName::try_from(topic).unwrap(),
            packet_id: id.map(pid),
            properties: PublishProperties::default(),
            payload: Bytes::from(payload.to_owned()),
        }))
        .await;
    }

    /// Proves the broker handled everything this client sent so far, and wrote whatever of
    /// its answers was not held back: sends a SUBSCRIBE (a change of the persistent session)
    /// and waits until the storage saw it. Returns the SUBSCRIBE's packet identifier; its
    /// SUBACK waits for the storage like the rest.
    async fn fence(&mut self, storage: &RecordingStorage) -> u16 {
        self.fences += 1;
        let id = 1000 + self.fences;
        let filter = format!("fence/{}/{}", self.id, self.fences);
        let mark = storage.mark();
        self.subscribe(id, &filter, QoS::AtMostOnce).await;
        let quoted = format!("{filter:?}");
        let who = format!("save {} ", self.id);
        storage
            .saw(mark, |l| l.starts_with(&who) && l.contains(&quoted))
            .await;
        id
    }

    /// Fails if a packet arrives within [`SETTLE`].
    async fn assert_nothing(&mut self, why: &str) {
        if let Ok(p) = timeout(SETTLE, self.next()).await {
            panic!("{}: {why}, but got {p:?}", self.id);
        }
    }

    /// After a fence: the next packets are `expected` and the fence's SUBACK, in either order.
    async fn expect_with_fence(&mut self, fence: u16, expected: impl Fn(&Packet) -> bool) {
        let (mut got, mut fenced) = (false, false);
        while !(got && fenced) {
            match self.recv().await {
                Some(Packet::SubAck(ack)) if !fenced && ack.packet_id == pid(fence) => {
                    fenced = true
                }
                Some(p) if !got && expected(&p) => got = true,
                other => panic!("{}: unexpected {other:?}", self.id),
            }
        }
    }
}

fn is_puback(id: u16, reason: ReasonCode) -> impl Fn(&Packet) -> bool {
    move |p| matches!(p, Packet::PubAck(a) if a.packet_id == pid(id) && a.reason == reason)
}

async fn expect_suback(raw: &mut Raw, id: u16) {
    match raw.recv().await {
        Some(Packet::SubAck(ack)) if ack.packet_id == pid(id) => {}
        other => panic!("{}: expected SUBACK {id}, got {other:?}", raw.id),
    }
}

#[tokio::test]
async fn puback_waits_for_the_stored_message_and_the_retained_message() {
    let (broker, addr, storage, _dir) = start().await;
    let mut sub = Raw::connect(addr, "sub", true).await;
    sub.subscribe(1, "t", QoS::AtLeastOnce).await;
    expect_suback(&mut sub, 1).await;
    // Persistent, so that its fences are changes to storage.
    let mut publisher = Raw::connect(addr, "pub", true).await;

    // A message routed to a persistent session.
    storage.hold();
    let mark = storage.mark();
    publisher.publish(Some(1), "t", "m", QoS::AtLeastOnce).await;
    storage.saw(mark, |l| l == "store sub t").await;
    let fence = publisher.fence(&storage).await;
    publisher
        .assert_nothing("PUBACK before the message was durable")
        .await;
    storage.release();
    publisher
        .expect_with_fence(fence, is_puback(1, ReasonCode::Success))
        .await;

    // A retained message, which reaches no subscriber.
    storage.hold();
    let mark = storage.mark();
    publisher
        .publish_retained(Some(2), "r", "kept", QoS::AtLeastOnce, true)
        .await;
    storage.saw(mark, |l| l == "retain r").await;
    let fence = publisher.fence(&storage).await;
    publisher
        .assert_nothing("PUBACK before the retained message was durable")
        .await;
    storage.release();
    publisher
        .expect_with_fence(fence, is_puback(2, ReasonCode::NoMatchingSubscribers))
        .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn pubrec_and_pubcomp_wait_for_the_incoming_qos2_state() {
    let (broker, addr, storage, _dir) = start().await;
    let mut publisher = Raw::connect(addr, "pub", true).await;

    storage.hold();
    let mark = storage.mark();
    publisher.publish(Some(7), "q", "m", QoS::ExactlyOnce).await;
    storage.saw(mark, |l| l == "inbound pub 7 true").await;
    let fence = publisher.fence(&storage).await;
    publisher
        .assert_nothing("PUBREC before the packet identifier was durable")
        .await;
    storage.release();
    publisher
        .expect_with_fence(
            fence,
            |p| matches!(p, Packet::PubRec(r) if r.packet_id == pid(7) && !r.reason.is_error()),
        )
        .await;

    storage.hold();
    let mark = storage.mark();
    publisher
        .send(Packet::PubRel(PubResponse::success(pid(7))))
        .await;
    storage.saw(mark, |l| l == "inbound pub 7 false").await;
    let fence = publisher.fence(&storage).await;
    publisher
        .assert_nothing("PUBCOMP before the release was durable")
        .await;
    storage.release();
    publisher
        .expect_with_fence(fence, |p| {
            matches!(p, Packet::PubComp(c) if c.packet_id == pid(7) && c.reason == ReasonCode::Success)
        })
        .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn pubrel_waits_for_the_stored_flow_state() {
    let (broker, addr, storage, _dir) = start().await;
    let mut sub = Raw::connect(addr, "sub", true).await;
    sub.subscribe(1, "q", QoS::ExactlyOnce).await;
    expect_suback(&mut sub, 1).await;
    let mut publisher = Raw::connect(addr, "pub", false).await;
    publisher.publish(Some(1), "q", "m", QoS::ExactlyOnce).await;
    let packet_id = match sub.recv().await {
        Some(Packet::Publish(p)) if p.qos == QoS::ExactlyOnce => p.packet_id.unwrap(),
        other => panic!("expected the QoS 2 PUBLISH, got {other:?}"),
    };

    storage.hold();
    let mark = storage.mark();
    sub.send(Packet::PubRec(PubResponse::success(packet_id)))
        .await;
    storage
        .saw(mark, |l| l == format!("flow sub {packet_id} ReleaseSent"))
        .await;
    let fence = sub.fence(&storage).await;
    sub.assert_nothing("PUBREL before the released state was durable")
        .await;
    storage.release();
    sub.expect_with_fence(
        fence,
        |p| matches!(p, Packet::PubRel(r) if r.packet_id == packet_id),
    )
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn suback_waits_for_the_stored_subscription() {
    let (broker, addr, storage, _dir) = start().await;
    let mut sub = Raw::connect(addr, "sub", true).await;

    storage.hold();
    let mark = storage.mark();
    sub.subscribe(5, "a/b", QoS::AtLeastOnce).await;
    storage
        .saw(mark, |l| {
            l.starts_with("save sub ") && l.contains("\"a/b\"")
        })
        .await;
    let fence = sub.fence(&storage).await;
    sub.assert_nothing("SUBACK before the subscription was durable")
        .await;
    storage.release();
    sub.expect_with_fence(fence, |p| {
        matches!(p, Packet::SubAck(a) if a.packet_id == pid(5) && a.reasons == [ReasonCode::GrantedQoS1])
    })
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn connack_waits_for_the_stored_session() {
    let (broker, addr, storage, _dir) = start().await;

    storage.hold();
    let mark = storage.mark();
    let mut late = Raw::start_connect(addr, "late", true).await;
    storage.saw(mark, |l| l == "save late []").await;
    let fence = late.fence(&storage).await;
    late.assert_nothing("CONNACK before the session was durable")
        .await;
    storage.release();
    match late.recv().await {
        Some(Packet::ConnAck(ack)) => assert_eq!(ack.reason, ReasonCode::Success),
        other => panic!("expected CONNACK first, got {other:?}"),
    }
    expect_suback(&mut late, fence).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_stored_message_is_published_only_once_durable() {
    let (broker, addr, storage, _dir) = start().await;
    let mut sub = Raw::connect(addr, "sub", true).await;
    sub.subscribe(1, "t", QoS::AtLeastOnce).await;
    expect_suback(&mut sub, 1).await;
    let mut publisher = Raw::connect(addr, "pub", false).await;

    storage.hold();
    let mark = storage.mark();
    publisher
        .publish(Some(1), "t", "stored", QoS::AtLeastOnce)
        .await;
    storage.saw(mark, |l| l == "store sub t").await;
    let fence = sub.fence(&storage).await;
    sub.assert_nothing("PUBLISH of a message not yet durable")
        .await;
    storage.release();
    sub.expect_with_fence(
        fence,
        |p| matches!(p, Packet::Publish(m) if m.payload == "stored" && m.qos == QoS::AtLeastOnce),
    )
    .await;
    broker.shutdown().await;
}

/// The next packets are a DISCONNECT with 0x80, then the end of the connection: nothing that
/// waited for the failed storage goes out.
async fn expect_closed_for_failure(raw: &mut Raw) {
    match raw.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::UnspecifiedError),
        other => panic!("{}: expected DISCONNECT 0x80, got {other:?}", raw.id),
    }
    if let Some(p) = raw.recv().await {
        panic!("{}: expected the connection to end, got {p:?}", raw.id);
    }
}

/// What a connection already had acknowledged and delivered stands, and a connection with
/// nothing waiting for storage keeps working.
async fn expect_unaffected(addr: SocketAddr, idle: &mut Raw) {
    idle.send(Packet::PingReq).await;
    match idle.recv().await {
        Some(Packet::PingResp) => {}
        other => panic!("idle: expected PINGRESP, got {other:?}"),
    }
    // Between clean sessions nothing needs storage: still acknowledged and delivered. The
    // retained message made durable before the failure reaches a new subscriber.
    let mut watcher = Raw::connect(addr, "watcher", false).await;
    watcher.subscribe(1, "c/#", QoS::AtLeastOnce).await;
    expect_suback(&mut watcher, 1).await;
    match watcher.recv().await {
        Some(Packet::Publish(p)) => assert!(p.retain && p.payload == "kept", "{p:?}"),
        other => panic!("watcher: expected the retained message, got {other:?}"),
    }
    let mut clean = Raw::connect(addr, "clean", false).await;
    clean
        .publish(Some(1), "c/x", "live", QoS::AtLeastOnce)
        .await;
    match clean.recv().await {
        Some(p) if is_puback(1, ReasonCode::Success)(&p) => {}
        other => panic!("clean: expected PUBACK, got {other:?}"),
    }
    match watcher.recv().await {
        Some(Packet::Publish(p)) => assert!(!p.retain && p.payload == "live", "{p:?}"),
        other => panic!("watcher: expected the new message, got {other:?}"),
    }
}

/// Connects "sub" (persistent, subscribed to `t`, which it will wait for), "idle" (persistent,
/// nothing waiting) and "pub"; sets a retained message and delivers one stored message before
/// anything fails.
async fn before_failure(addr: SocketAddr) -> (Raw, Raw, Raw) {
    let mut sub = Raw::connect(addr, "sub", true).await;
    sub.subscribe(1, "t", QoS::AtLeastOnce).await;
    expect_suback(&mut sub, 1).await;
    let mut idle = Raw::connect(addr, "idle", true).await;
    idle.subscribe(1, "u", QoS::AtLeastOnce).await;
    expect_suback(&mut idle, 1).await;
    let mut publisher = Raw::connect(addr, "pub", false).await;
    publisher
        .publish_retained(Some(1), "c/kept", "kept", QoS::AtLeastOnce, true)
        .await;
    publisher
        .publish(Some(2), "t", "before", QoS::AtLeastOnce)
        .await;
    for id in [1, 2] {
        match publisher.recv().await {
            Some(Packet::PubAck(a)) if a.packet_id == pid(id) && !a.reason.is_error() => {}
            other => panic!("pub: expected PUBACK {id}, got {other:?}"),
        }
    }
    match sub.recv().await {
        Some(Packet::Publish(p)) if p.payload == "before" => {
            sub.send(Packet::PubAck(PubResponse::success(p.packet_id.unwrap())))
                .await;
        }
        other => panic!("sub: expected the first message, got {other:?}"),
    }
    (sub, idle, publisher)
}

#[tokio::test]
async fn a_storage_failure_closes_connections_that_wait_for_it_and_acknowledges_nothing_more() {
    let (broker, addr, storage, _dir) = start().await;
    let (mut sub, mut idle, mut publisher) = before_failure(addr).await;

    // The failure comes while a publication waits for storage.
    storage.hold();
    let mark = storage.mark();
    publisher
        .publish(Some(3), "t", "after", QoS::AtLeastOnce)
        .await;
    storage.saw(mark, |l| l == "store sub t").await;
    storage.fail();
    expect_closed_for_failure(&mut publisher).await;
    expect_closed_for_failure(&mut sub).await;
    expect_unaffected(addr, &mut idle).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn after_a_storage_failure_a_publication_that_needs_storage_closes_the_connection() {
    let (broker, addr, storage, _dir) = start().await;
    let (mut sub, mut idle, _publisher) = before_failure(addr).await;

    // The storage fails while nothing waits for it; a publisher that comes later needs it.
    storage.fail();
    let mut late = Raw::connect(addr, "late", false).await;
    let mark = storage.mark();
    late.publish(Some(1), "t", "after", QoS::AtLeastOnce).await;
    storage.saw(mark, |l| l == "store sub t").await;
    expect_closed_for_failure(&mut late).await;
    expect_closed_for_failure(&mut sub).await;
    expect_unaffected(addr, &mut idle).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_storage_failure_before_connack_closes_without_any_packet() {
    let (broker, addr, storage, _dir) = start().await;
    let mut idle = Raw::connect(addr, "idle", true).await;

    storage.hold();
    let mark = storage.mark();
    let mut late = Raw::start_connect(addr, "late", true).await;
    storage.saw(mark, |l| l == "save late []").await;
    storage.fail();
    // CONNACK waited for the session to be durable and never will be; nothing may go out
    // before a CONNACK, not even a DISCONNECT [MQTT-3.2.0-1].
    if let Some(p) = late.recv().await {
        panic!("late: expected the connection to end without a packet, got {p:?}");
    }
    idle.send(Packet::PingReq).await;
    match idle.recv().await {
        Some(Packet::PingResp) => {}
        other => panic!("idle: expected PINGRESP, got {other:?}"),
    }
    broker.shutdown().await;
}
