//! MQTT over QUIC (`quic://`), with noq as the client, trusting the CA the broker generated:
//! single-stream mode through the ordinary async client, and EMQX's multi-stream mode packet by
//! packet (acknowledgements and deliveries on their streams, data streams held until CONNACK,
//! a malformed data stream reset alone, lost streams, a stalled stream, the stream limit), the
//! ALPN, 0-RTT, and QUIC and TCP clients together.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mqttd_broker::{Broker, Config, ListenerKind};
use mqttd_client::{connect, connect_tcp, Client, Events};
use mqttd_proto::client::{ClientConfig, Event};
use mqttd_proto::codec::PacketReader;
use mqttd_proto::{
    ClientId, Connect, ConnectProperties, Message, Packet, PacketId, ProtocolVersion, Publish,
    PublishProperties, QoS, ReasonCode, Subscribe, SubscribeProperties, Subscription,
    SubscriptionOptions, TopicFilter, TopicName,
};
use noq::crypto::rustls::QuicClientConfig;
use noq::{Connection, Endpoint, RecvStream, SendStream, TransportConfig, VarInt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::time::timeout;

/// Upper bound for anything that must happen; only a hang reaches it.
const WAIT: Duration = Duration::from_secs(30);

/// A broker with a QUIC and a TCP listener on loopback.
struct Setup {
    broker: Broker,
    quic: SocketAddr,
    tcp: SocketAddr,
    dir: tempfile::TempDir,
}

async fn start(config: Config) -> Setup {
    start_in(tempfile::tempdir().unwrap(), config).await
}

async fn start_in(dir: tempfile::TempDir, mut config: Config) -> Setup {
    config.listen = vec!["quic://127.0.0.1:0".into(), "tcp://127.0.0.1:0".into()];
    config.data_dir = dir.path().join("data");
    let broker = Broker::builder(config).start().await.unwrap();
    let quic = broker.addr(ListenerKind::Quic).unwrap();
    let tcp = broker.addr(ListenerKind::Tcp).unwrap();
    Setup {
        broker,
        quic,
        tcp,
        dir,
    }
}

impl Setup {
    fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("data/tls/ca.pem")
    }

    /// A client endpoint trusting the broker's CA, offering `alpn`.
    fn endpoint(&self, alpn: &[u8], transport: Option<TransportConfig>) -> Endpoint {
        client_endpoint(&self.ca(), alpn, transport)
    }

    /// A QUIC connection offering ALPN `mqtt`.
    async fn connect(&self) -> Connection {
        let endpoint = self.endpoint(b"mqtt", None);
        dial(&endpoint, self.quic).await.unwrap()
    }

    /// An MQTT client over a single QUIC stream.
    async fn single_stream(&self, config: ClientConfig) -> (Client, Events, bool) {
        let conn = self.connect().await;
        let (send, recv) = conn.open_bi().await.unwrap();
        let (client, events, ack) = connect(tokio::io::join(recv, send), config, None)
            .await
            .unwrap();
        // The connection lives as long as its streams.
        std::mem::forget(conn);
        (client, events, ack.session_present)
    }

    fn metric(&self, name: &str) -> u64 {
        let text = self.broker.metrics().render();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }
}

fn client_endpoint(ca: &Path, alpn: &[u8], transport: Option<TransportConfig>) -> Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.enable_early_data = true;
    let mut config = noq::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    if let Some(transport) = transport {
        config.transport_config(Arc::new(transport));
    }
    let endpoint = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
}

async fn dial(endpoint: &Endpoint, addr: SocketAddr) -> Result<Connection, noq::ConnectionError> {
    timeout(WAIT, endpoint.connect(addr, "localhost").unwrap())
        .await
        .expect("handshake in time")
}

fn topic(t: &str) -> TopicName {
    TopicName::try_from(t).unwrap()
}

fn filter(f: &str) -> TopicFilter {
    TopicFilter::try_from(f).unwrap()
}

fn id(n: u16) -> PacketId {
    PacketId::new(n).unwrap()
}

fn connect_packet(client_id: &str, clean_start: bool, expiry: u32) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        clean_start,
        keep_alive: 60,
        client_id: ClientId::try_from(client_id).unwrap(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties {
            session_expiry_interval: Some(expiry),
            ..ConnectProperties::default()
        },
    }))
}

fn subscribe_packet(packet_id: u16, f: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: id(packet_id),
        properties: SubscribeProperties::default(),
        filters: vec![Subscription {
            filter: filter(f),
            options: SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            },
        }],
    })
}

fn publish_packet(packet_id: Option<u16>, t: &str, payload: &[u8]) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: if packet_id.is_some() {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        },
        retain: false,
        topic: topic(t),
        packet_id: packet_id.map(id),
        properties: PublishProperties::default(),
        payload: Bytes::copy_from_slice(payload),
    })
}

/// One QUIC stream, spoken to packet by packet.
struct Raw {
    send: SendStream,
    recv: RecvStream,
    buf: BytesMut,
}

impl Raw {
    async fn open(conn: &Connection) -> Self {
        let (send, recv) = conn.open_bi().await.unwrap();
        Self {
            send,
            recv,
            buf: BytesMut::new(),
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, packet: &Packet) {
        let mut bytes = BytesMut::new();
        packet.encode(ProtocolVersion::V5, &mut bytes).unwrap();
        self.write(&bytes).await;
    }

    /// The next packet; `None` when the stream ends or fails.
    async fn recv(&mut self) -> Option<Packet> {
        loop {
            let mut reader = PacketReader::new(4 << 20);
            if let Some(p) = reader
                .read(&mut self.buf, Some(ProtocolVersion::V5))
                .unwrap()
            {
                return Some(p);
            }
            let chunk = timeout(WAIT, self.recv.read_chunk(64 * 1024))
                .await
                .expect("a packet in time");
            match chunk {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                _ => return None,
            }
        }
    }

    async fn expect(&mut self, what: &str) -> Packet {
        match self.recv().await {
            Some(p) => p,
            None => panic!("stream ended waiting for {what}"),
        }
    }
}

/// A multi-stream client: the control stream with CONNECT sent and CONNACK read.
async fn control(conn: &Connection, client_id: &str) -> Raw {
    let mut control = Raw::open(conn).await;
    control.send(&connect_packet(client_id, true, 0)).await;
    match control.expect("CONNACK").await {
        Packet::ConnAck(ack) => assert_eq!(ack.reason, ReasonCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    control
}

/// PINGREQ on `raw`, and its PINGRESP.
async fn ping(raw: &mut Raw) {
    raw.send(&Packet::PingReq).await;
    loop {
        match raw.expect("PINGRESP").await {
            Packet::PingResp => return,
            Packet::Publish(_) => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }
}

async fn suback(raw: &mut Raw, packet_id: u16) {
    match raw.expect("SUBACK").await {
        Packet::SubAck(ack) => assert_eq!(ack.packet_id, id(packet_id)),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

async fn publish_payload(raw: &mut Raw) -> Bytes {
    match raw.expect("PUBLISH").await {
        Packet::Publish(p) => p.payload,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

fn message(t: &str, payload: Vec<u8>, qos: QoS) -> Message {
    Message::new(topic(t), payload, qos, false)
}

async fn publish(client: &Client, message: Message) {
    // Sent or queued: either way it goes.
    let _ = client.publish(message).await.unwrap();
}

fn config(client_id: &str) -> ClientConfig {
    ClientConfig::new(ClientId::try_from(client_id).unwrap())
}

async fn next_payload(events: &mut Events) -> Vec<u8> {
    let publish = timeout(WAIT, events.next_message())
        .await
        .expect("a message in time")
        .expect("connection up");
    publish.message.payload.to_vec()
}

/// Waits until a QoS 1 or 2 publication completed.
async fn delivered(events: &mut Events) {
    loop {
        match timeout(WAIT, events.recv())
            .await
            .expect("an event in time")
        {
            Some(Event::Delivered { .. }) => return,
            Some(Event::Closed { reason, .. }) => panic!("closed: {reason}"),
            Some(_) => {}
            None => panic!("connection ended"),
        }
    }
}

#[tokio::test]
async fn single_stream_pub_sub_at_every_qos_and_a_large_payload() {
    let mut broker_config = Config::default();
    broker_config.max_packet_size = 2 << 20;
    let s = start(broker_config).await;
    let (sub, mut sub_events, _) = s.single_stream(config("sub")).await;
    sub.subscribe_one(filter("t/#"), QoS::ExactlyOnce)
        .await
        .unwrap();
    let (publisher, mut pub_events, _) = s.single_stream(config("pub")).await;
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let payload = format!("qos {}", qos as u8).into_bytes();
        publish(&publisher, message("t/a", payload.clone(), qos)).await;
        if qos != QoS::AtMostOnce {
            delivered(&mut pub_events).await;
        }
        assert_eq!(next_payload(&mut sub_events).await, payload);
    }
    let large: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    publish(
        &publisher,
        message("t/large", large.clone(), QoS::AtLeastOnce),
    )
    .await;
    delivered(&mut pub_events).await;
    assert!(next_payload(&mut sub_events).await == large);
    assert_eq!(s.metric("mqttd_quic_handshakes_total"), 2);
    assert_eq!(s.metric("mqttd_quic_connections"), 2);
    s.broker.shutdown().await;
}

#[tokio::test]
async fn acknowledgements_and_deliveries_go_on_the_stream_they_belong_to() {
    let s = start(Config::default()).await;
    let conn = s.connect().await;
    let mut ctl = control(&conn, "m").await;
    let mut subs = Raw::open(&conn).await;
    subs.send(&subscribe_packet(1, "t", QoS::AtLeastOnce)).await;
    suback(&mut subs, 1).await;
    let mut pubs = Raw::open(&conn).await;
    pubs.send(&publish_packet(Some(7), "t", b"hello")).await;
    match pubs.expect("PUBACK").await {
        Packet::PubAck(ack) => assert_eq!(ack.packet_id, id(7)),
        other => panic!("expected PUBACK on the publishing stream, got {other:?}"),
    }
    assert_eq!(&publish_payload(&mut subs).await[..], b"hello");
    ping(&mut ctl).await;
    s.broker.shutdown().await;
}

#[tokio::test]
async fn a_data_stream_written_before_connect_is_held_until_connack() {
    let s = start(Config::default()).await;
    let conn = s.connect().await;
    let mut ctl = Raw::open(&conn).await;
    let mut data = Raw::open(&conn).await;
    data.send(&subscribe_packet(3, "early", QoS::AtMostOnce))
        .await;
    // Let the data stream's packet reach the broker first (the verdict does not depend on it).
    tokio::time::sleep(Duration::from_millis(50)).await;
    ctl.send(&connect_packet("early", true, 0)).await;
    match ctl.expect("CONNACK").await {
        Packet::ConnAck(ack) => assert_eq!(ack.reason, ReasonCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    suback(&mut data, 3).await;
    ctl.send(&publish_packet(None, "early", b"x")).await;
    assert_eq!(&publish_payload(&mut data).await[..], b"x");
    ping(&mut ctl).await;
    s.broker.shutdown().await;
}

#[tokio::test]
async fn a_malformed_packet_on_a_data_stream_resets_that_stream_only() {
    let s = start(Config::default()).await;
    let conn = s.connect().await;
    let mut ctl = control(&conn, "m").await;
    let mut subs = Raw::open(&conn).await;
    subs.send(&subscribe_packet(1, "t", QoS::AtMostOnce)).await;
    suback(&mut subs, 1).await;
    let mut bad = Raw::open(&conn).await;
    // Packet type 0 is reserved.
    bad.write(&[0x00, 0x00]).await;
    let code = match timeout(WAIT, bad.recv.read_chunk(1024)).await.unwrap() {
        Err(noq::ReadError::Reset(code)) => code,
        other => panic!("expected the stream to be reset, got {other:?}"),
    };
    assert!(
        [0x81u32, 0x82].map(VarInt::from_u32).contains(&code),
        "reset with a malformed-packet or protocol-error code: {code}"
    );
    // The connection and its other streams go on.
    ping(&mut ctl).await;
    ctl.send(&publish_packet(None, "t", b"still")).await;
    assert_eq!(&publish_payload(&mut subs).await[..], b"still");
    assert_eq!(s.metric("mqttd_quic_stream_resets_total"), 1);
    assert_eq!(s.metric("mqttd_protocol_errors_total"), 1);
    s.broker.shutdown().await;
}

#[tokio::test]
async fn a_reset_subscription_stream_moves_its_messages_to_the_control_stream() {
    let s = start(Config::default()).await;
    let conn = s.connect().await;
    let mut ctl = control(&conn, "m").await;
    let mut subs = Raw::open(&conn).await;
    subs.send(&subscribe_packet(1, "t", QoS::AtLeastOnce)).await;
    suback(&mut subs, 1).await;
    subs.send.reset(VarInt::from_u32(0)).unwrap();
    subs.recv.stop(VarInt::from_u32(0)).unwrap();
    ping(&mut ctl).await;
    ctl.send(&publish_packet(None, "t", b"moved")).await;
    loop {
        match ctl.expect("the delivery").await {
            Packet::Publish(p) => {
                assert_eq!(&p.payload[..], b"moved");
                break;
            }
            Packet::PingResp => {}
            other => panic!("expected the delivery on the control stream, got {other:?}"),
        }
    }
    s.broker.shutdown().await;
}

#[tokio::test]
async fn losing_the_control_stream_closes_the_connection() {
    let s = start(Config::default()).await;
    let conn = s.connect().await;
    let mut ctl = control(&conn, "m").await;
    let _data = Raw::open(&conn).await;
    ctl.send.reset(VarInt::from_u32(0)).unwrap();
    let closed = timeout(WAIT, conn.closed()).await.expect("closed in time");
    assert!(
        matches!(closed, noq::ConnectionError::ApplicationClosed(_)),
        "{closed}"
    );
    s.broker.shutdown().await;
}

#[tokio::test]
async fn a_stalled_data_stream_does_not_delay_pingresp() {
    let s = start(Config::default()).await;
    let mut transport = TransportConfig::default();
    // The subscriber's stream takes little before it stalls.
    transport.stream_receive_window(VarInt::from_u32(32 * 1024));
    let endpoint = s.endpoint(b"mqtt", Some(transport));
    let conn = dial(&endpoint, s.quic).await.unwrap();
    let mut ctl = control(&conn, "stalled").await;
    let mut busy = Raw::open(&conn).await;
    busy.send(&subscribe_packet(1, "busy", QoS::AtMostOnce))
        .await;
    suback(&mut busy, 1).await;
    // From now on the busy stream is never read.
    let (publisher, mut events, _) = connect_tcp(s.tcp, config("pub"), None).await.unwrap();
    for _ in 0..200 {
        publish(
            &publisher,
            message("busy", vec![b'x'; 4096], QoS::AtMostOnce),
        )
        .await;
    }
    // A QoS 1 publication completes after the broker handled those before it.
    publish(
        &publisher,
        message("fence", b"f".to_vec(), QoS::AtLeastOnce),
    )
    .await;
    delivered(&mut events).await;
    for _ in 0..5 {
        ping(&mut ctl).await;
    }
    // The busy stream did stall: far less than was published got through.
    let mut got = 0;
    while let Ok(Ok(Some(chunk))) = timeout(Duration::ZERO, busy.recv.read_chunk(1 << 20)).await {
        got += chunk.len();
    }
    assert!(
        got < 200 * 4096 / 2,
        "{got} bytes arrived on the stalled stream"
    );
    s.broker.shutdown().await;
}

#[tokio::test]
async fn streams_beyond_peer_bidi_stream_count_are_not_granted() {
    let mut config = Config::default();
    config.quic.peer_bidi_stream_count = 3;
    let s = start(config).await;
    let conn = s.connect().await;
    let mut ctl = control(&conn, "m").await;
    let mut one = Raw::open(&conn).await;
    let mut two = Raw::open(&conn).await;
    one.send(&Packet::PingReq).await;
    two.send(&Packet::PingReq).await;
    let mut fourth = pin!(conn.open_bi());
    let pending = poll_fn(|cx| Poll::Ready(fourth.as_mut().poll(cx).is_pending())).await;
    assert!(pending, "a fourth stream was granted");
    ping(&mut ctl).await;
    // Once a data stream ends, its place is granted again.
    one.send.finish().unwrap();
    let granted = timeout(WAIT, fourth).await.expect("granted in time");
    assert!(granted.is_ok());
    s.broker.shutdown().await;
}

#[tokio::test]
async fn quic_and_tcp_clients_exchange_messages_both_ways() {
    let s = start(Config::default()).await;
    let (quic, mut quic_events, _) = s.single_stream(config("quic")).await;
    let (tcp, mut tcp_events, _) = connect_tcp(s.tcp, config("tcp"), None).await.unwrap();
    quic.subscribe_one(filter("to/quic"), QoS::AtLeastOnce)
        .await
        .unwrap();
    tcp.subscribe_one(filter("to/tcp"), QoS::AtLeastOnce)
        .await
        .unwrap();
    publish(
        &tcp,
        message("to/quic", b"from tcp".to_vec(), QoS::AtLeastOnce),
    )
    .await;
    publish(
        &quic,
        message("to/tcp", b"from quic".to_vec(), QoS::AtLeastOnce),
    )
    .await;
    assert_eq!(next_payload(&mut quic_events).await, b"from tcp");
    assert_eq!(next_payload(&mut tcp_events).await, b"from quic");
    s.broker.shutdown().await;
}

#[tokio::test]
async fn a_session_made_over_tcp_resumes_over_quic() {
    let s = start(Config::default()).await;
    let mut persistent = config("roamer");
    persistent.session_expiry_interval = 300;
    let (tcp, _events, _) = connect_tcp(s.tcp, persistent.clone(), None).await.unwrap();
    tcp.subscribe_one(filter("queued"), QoS::AtLeastOnce)
        .await
        .unwrap();
    tcp.disconnect(ReasonCode::Success, None).await.unwrap();
    let (publisher, mut events, _) = connect_tcp(s.tcp, config("pub"), None).await.unwrap();
    for i in 0..3u8 {
        publish(&publisher, message("queued", vec![i], QoS::AtLeastOnce)).await;
        delivered(&mut events).await;
    }
    persistent.clean_start = false;
    let (_quic, mut quic_events, present) = s.single_stream(persistent).await;
    assert!(present, "the session resumed");
    for i in 0..3u8 {
        assert_eq!(next_payload(&mut quic_events).await, [i]);
    }
    s.broker.shutdown().await;
}

#[tokio::test]
async fn a_client_offering_another_alpn_fails_the_handshake() {
    let mut config = Config::default();
    config.quic.http3 = false;
    let s = start(config).await;
    for alpn in [&b"h3"[..], b"mqtt-ish"] {
        let endpoint = s.endpoint(alpn, None);
        let result = dial(&endpoint, s.quic).await;
        assert!(result.is_err(), "ALPN {alpn:?} was accepted");
    }
    // An MQTT client still gets in.
    let conn = s.connect().await;
    control(&conn, "after").await;
    s.broker.shutdown().await;
}

#[tokio::test]
async fn http3_is_offered_on_the_same_port_unless_disabled() {
    let s = start(Config::default()).await;
    let endpoint = s.endpoint(b"h3", None);
    let conn = dial(&endpoint, s.quic).await.unwrap();
    // The HTTP/3 server opens its control stream (type 0x00) at once.
    let mut control = timeout(WAIT, conn.accept_uni()).await.unwrap().unwrap();
    let mut kind = [0u8; 1];
    timeout(WAIT, control.read_exact(&mut kind))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kind, [0x00]);
    s.broker.shutdown().await;
}

/// The endpoint lets every client open the three unidirectional streams HTTP/3 needs; an MQTT
/// client has no use for them, and the broker stops any it opens.
#[tokio::test]
async fn an_mqtt_clients_unidirectional_streams_are_stopped() {
    let s = start(Config::default()).await;
    let conn = s.connect().await;
    let mut ctl = control(&conn, "uni").await;
    let mut stream = conn.open_uni().await.unwrap();
    let _ = stream.write_all(b"not for anyone").await;
    let stopped = timeout(WAIT, stream.stopped()).await.unwrap().unwrap();
    assert_eq!(stopped, Some(VarInt::from_u32(0x82)));
    // The MQTT connection goes on.
    ping(&mut ctl).await;
    s.broker.shutdown().await;
}

#[tokio::test]
async fn connect_may_come_as_0rtt_early_data() {
    let s = start(Config::default()).await;
    let endpoint = s.endpoint(b"mqtt", None);
    // A first connection gets a session ticket.
    let first = dial(&endpoint, s.quic).await.unwrap();
    control(&first, "first").await;
    first.close(VarInt::from_u32(0), b"");
    let connecting = endpoint.connect(s.quic, "localhost").unwrap();
    let Ok((conn, accepted)) = connecting.into_0rtt() else {
        panic!("no 0-RTT offered with the ticket");
    };
    let mut ctl = Raw::open(&conn).await;
    ctl.send(&connect_packet("early", true, 0)).await;
    match ctl.expect("CONNACK").await {
        Packet::ConnAck(ack) => assert_eq!(ack.reason, ReasonCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert!(
        timeout(WAIT, accepted).await.unwrap(),
        "the broker accepted 0-RTT"
    );
    ping(&mut ctl).await;
    s.broker.shutdown().await;
}

#[tokio::test]
async fn unvalidated_clients_get_a_retry_above_the_handshake_threshold() {
    let mut config = Config::default();
    config.quic.retry_above_handshakes = 0;
    let s = start(config).await;
    // noq's client answers the Retry by itself: the connection comes up a round trip later.
    let conn = s.connect().await;
    control(&conn, "retried").await;
    assert_eq!(s.metric("mqttd_quic_retries_total"), 1);
    s.broker.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_max_connections_are_refused() {
    let mut config = Config::default();
    config.max_connections = 1;
    let s = start(config).await;
    let first = s.connect().await;
    // Held: dropping the control stream would end the connection.
    let _ctl = control(&first, "first").await;
    let endpoint = s.endpoint(b"mqtt", None);
    let refused = dial(&endpoint, s.quic).await;
    assert!(
        matches!(refused, Err(noq::ConnectionError::ConnectionClosed(_))),
        "{refused:?}"
    );
    assert_eq!(s.metric("mqttd_connections_refused_total"), 1);
    s.broker.shutdown().await;
}

/// A client with MQTT keep alive 60 may stay silent for up to 90 s (1.5 times it): the QUIC
/// idle timeout must not end the connection sooner. The client here sends nothing at all for
/// 70 s, no QUIC pings either, and its own idle timeout is longer, so only the broker's could
/// end it. Real time: the stack's timers and real UDP do not mix with a paused clock.
#[tokio::test]
async fn a_client_silent_for_70_seconds_with_keep_alive_60_stays_connected() {
    let s = start(Config::default()).await;
    let mut transport = TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(120).try_into().unwrap()));
    transport.keep_alive_interval(None);
    let endpoint = s.endpoint(b"mqtt", Some(transport));
    let conn = dial(&endpoint, s.quic).await.unwrap();
    let mut ctl = control(&conn, "silent").await;
    tokio::time::sleep(Duration::from_secs(70)).await;
    assert!(
        conn.close_reason().is_none(),
        "closed while silent: {:?}",
        conn.close_reason()
    );
    ping(&mut ctl).await;
    s.broker.shutdown().await;
}
