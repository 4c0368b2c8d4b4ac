//! What the QUIC tests share: a broker with a QUIC and a TCP listener, noq client endpoints
//! trusting the CA it generated, one QUIC stream spoken to packet by packet ([`Raw`]), MQTT
//! clients over one stream, and a UDP relay that loses datagrams on purpose ([`LossyRelay`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mqttd_broker::{Broker, Config, ListenerKind};
use mqttd_client::{connect, Client, Events};
use mqttd_proto::client::{ClientConfig, Event};
use mqttd_proto::codec::PacketReader;
use mqttd_proto::{
    ClientId, Connect, ConnectProperties, Message, Packet, PacketId, ProtocolVersion, Publish,
    PublishProperties, QoS, ReasonCode, Subscribe, SubscribeProperties, Subscription,
    SubscriptionOptions, TopicFilter, TopicName,
};
use noq::crypto::rustls::QuicClientConfig;
use noq::{Connection, Endpoint, RecvStream, SendStream, TransportConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::WAIT;

/// A broker with a QUIC and a TCP listener on loopback.
pub(crate) struct Setup {
    pub(crate) broker: Broker,
    pub(crate) quic: SocketAddr,
    pub(crate) tcp: SocketAddr,
    pub(crate) dir: tempfile::TempDir,
}

/// Starts a broker with `config` and its data in a new temporary directory.
pub(crate) async fn start(config: Config) -> Setup {
    start_in(tempfile::tempdir().unwrap(), config).await
}

/// Starts a broker with `config` and its data under `dir`.
pub(crate) async fn start_in(dir: tempfile::TempDir, mut config: Config) -> Setup {
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
    /// The CA the broker generated.
    pub(crate) fn ca(&self) -> PathBuf {
        self.dir.path().join("data/tls/ca.pem")
    }

    /// A client endpoint trusting the broker's CA, offering `alpn`.
    pub(crate) fn endpoint(&self, alpn: &[u8], transport: Option<TransportConfig>) -> Endpoint {
        client_endpoint(&self.ca(), alpn, transport)
    }

    /// A QUIC connection offering ALPN `mqtt`.
    pub(crate) async fn connect(&self) -> Connection {
        self.connect_with(TransportConfig::default()).await
    }

    /// A QUIC connection offering ALPN `mqtt`, with the client's `transport` settings.
    pub(crate) async fn connect_with(&self, transport: TransportConfig) -> Connection {
        let endpoint = self.endpoint(b"mqtt", Some(transport));
        dial(&endpoint, self.quic).await.unwrap()
    }

    /// A multi-stream client: the connection, and its control stream with CONNECT sent and
    /// CONNACK read.
    pub(crate) async fn multi_stream(&self, client_id: &str) -> (Connection, Raw) {
        let conn = self.connect().await;
        let ctl = control(&conn, client_id).await;
        (conn, ctl)
    }

    /// An MQTT client over a single QUIC stream; and whether a session was present.
    pub(crate) async fn single_stream(&self, config: ClientConfig) -> (Client, Events, bool) {
        self.single_stream_via(self.quic, config).await
    }

    /// An MQTT client over a single QUIC stream to `addr`, the broker's QUIC listener or a
    /// relay to it; and whether a session was present.
    pub(crate) async fn single_stream_via(
        &self,
        addr: SocketAddr,
        config: ClientConfig,
    ) -> (Client, Events, bool) {
        let endpoint = self.endpoint(b"mqtt", None);
        let conn = dial(&endpoint, addr).await.unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        let (client, events, ack) = connect(tokio::io::join(recv, send), config, None)
            .await
            .unwrap();
        // The connection lives as long as its streams.
        std::mem::forget(conn);
        (client, events, ack.session_present)
    }

    /// The value of the metric `name` (a counter's name ends in `_total`).
    pub(crate) fn metric(&self, name: &str) -> u64 {
        let text = self.broker.metrics().render();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    /// Waits until the metric `name` is above `floor`; returns it.
    pub(crate) async fn metric_above(&self, name: &str, floor: u64) -> u64 {
        let above = timeout(WAIT, async {
            loop {
                let value = self.metric(name);
                if value > floor {
                    return value;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        above.unwrap_or_else(|_| panic!("{name} stayed at {}", self.metric(name)))
    }

    /// Waits until the metric `name` is `value`.
    pub(crate) async fn metric_reaches(&self, name: &str, value: u64) {
        let reached = timeout(WAIT, async {
            while self.metric(name) != value {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(reached.is_ok(), "{name} stayed at {}", self.metric(name));
    }
}

/// A client endpoint trusting the CA certificates in `ca`, offering `alpn` and 0-RTT.
pub(crate) fn client_endpoint(
    ca: &Path,
    alpn: &[u8],
    transport: Option<TransportConfig>,
) -> Endpoint {
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

/// A QUIC handshake with `addr` as `localhost`.
pub(crate) async fn dial(
    endpoint: &Endpoint,
    addr: SocketAddr,
) -> Result<Connection, noq::ConnectionError> {
    timeout(WAIT, endpoint.connect(addr, "localhost").unwrap())
        .await
        .expect("handshake in time")
}

pub(crate) fn topic(t: &str) -> TopicName {
    TopicName::try_from(t).unwrap()
}

pub(crate) fn filter(f: &str) -> TopicFilter {
    TopicFilter::try_from(f).unwrap()
}

pub(crate) fn id(n: u16) -> PacketId {
    PacketId::new(n).unwrap()
}

pub(crate) fn connect_packet(client_id: &str, clean_start: bool, expiry: u32) -> Packet {
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

pub(crate) fn subscribe_packet(packet_id: u16, f: &str, qos: QoS) -> Packet {
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

/// PUBLISH at QoS 1 with `packet_id`, at QoS 0 without.
pub(crate) fn publish_packet(packet_id: Option<u16>, t: &str, payload: &[u8]) -> Packet {
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
pub(crate) struct Raw {
    pub(crate) send: SendStream,
    pub(crate) recv: RecvStream,
    buf: BytesMut,
}

impl Raw {
    pub(crate) async fn open(conn: &Connection) -> Self {
        let (send, recv) = conn.open_bi().await.unwrap();
        Self::new(send, recv)
    }

    /// A stream opened elsewhere (a peer-to-peer node's streams are noq's too).
    pub(crate) fn new(send: SendStream, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            buf: BytesMut::new(),
        }
    }

    pub(crate) async fn write(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
    }

    pub(crate) async fn send(&mut self, packet: &Packet) {
        let mut bytes = BytesMut::new();
        packet.encode(ProtocolVersion::V5, &mut bytes).unwrap();
        self.write(&bytes).await;
    }

    /// The next packet; `None` when the stream ends or fails.
    pub(crate) async fn recv(&mut self) -> Option<Packet> {
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

    pub(crate) async fn expect(&mut self, what: &str) -> Packet {
        match self.recv().await {
            Some(p) => p,
            None => panic!("stream ended waiting for {what}"),
        }
    }

    /// Reads a successful CONNACK.
    pub(crate) async fn connack(&mut self) {
        match self.expect("CONNACK").await {
            Packet::ConnAck(ack) => assert_eq!(ack.reason, ReasonCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Reads the SUBACK of `packet_id`.
    pub(crate) async fn suback(&mut self, packet_id: u16) {
        match self.expect("SUBACK").await {
            Packet::SubAck(ack) => assert_eq!(ack.packet_id, id(packet_id)),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// A new stream of `conn` on which the client subscribed to `f` with `packet_id`, the
    /// SUBACK read.
    pub(crate) async fn subscribed(conn: &Connection, packet_id: u16, f: &str, qos: QoS) -> Self {
        let mut stream = Self::open(conn).await;
        stream.send(&subscribe_packet(packet_id, f, qos)).await;
        stream.suback(packet_id).await;
        stream
    }

    /// The payload of the next packet, which must be a PUBLISH.
    pub(crate) async fn publish_payload(&mut self) -> Bytes {
        match self.expect("PUBLISH").await {
            Packet::Publish(p) => p.payload,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// PINGREQ, and its PINGRESP (deliveries before it are passed over).
    pub(crate) async fn ping(&mut self) {
        self.send(&Packet::PingReq).await;
        loop {
            match self.expect("PINGRESP").await {
                Packet::PingResp => return,
                Packet::Publish(_) => {}
                other => panic!("expected PINGRESP, got {other:?}"),
            }
        }
    }
}

/// A multi-stream client: the control stream with CONNECT sent and CONNACK read.
pub(crate) async fn control(conn: &Connection, client_id: &str) -> Raw {
    let mut control = Raw::open(conn).await;
    control.send(&connect_packet(client_id, true, 0)).await;
    control.connack().await;
    control
}

pub(crate) fn config(client_id: &str) -> ClientConfig {
    ClientConfig::new(ClientId::try_from(client_id).unwrap())
}

/// Publishes `payload` to `t` at `qos`: sent or queued, either way it goes.
pub(crate) async fn publish(client: &Client, t: &str, payload: impl Into<Bytes>, qos: QoS) {
    let message = Message::new(topic(t), payload.into(), qos, false);
    let _ = client.publish(message).await.unwrap();
}

/// Subscribes `client` to `f` at `qos`.
pub(crate) async fn subscribe(client: &Client, f: &str, qos: QoS) {
    client.subscribe_one(filter(f), qos).await.unwrap();
}

/// Waits until a QoS 1 or 2 publication completed.
pub(crate) async fn delivered(events: &mut Events) {
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

/// A UDP relay between one client and a QUIC server that drops every `every`th datagram in
/// each direction, counted from the first: loss that is the same on every run. The client
/// sends to [`Self::addr`]; the relay forwards from a socket of its own. It stops when
/// dropped.
pub(crate) struct LossyRelay {
    /// Where the client sends.
    pub(crate) addr: SocketAddr,
    dropped: Arc<Dropped>,
    task: JoinHandle<()>,
}

/// Datagrams the relay dropped, by direction.
#[derive(Default)]
struct Dropped {
    to_server: AtomicU64,
    to_client: AtomicU64,
}

impl LossyRelay {
    /// Relays to `server`, dropping every `every`th datagram each way (`every` > 1).
    pub(crate) async fn start(server: SocketAddr, every: u64) -> Self {
        assert!(every > 1, "a relay that drops everything");
        let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        back.connect(server).await.unwrap();
        let addr = front.local_addr().unwrap();
        let dropped = Arc::new(Dropped::default());
        let task = tokio::spawn(relay(front, back, every, dropped.clone()));
        Self {
            addr,
            dropped,
            task,
        }
    }

    /// Datagrams dropped on their way to the server.
    pub(crate) fn dropped_to_server(&self) -> u64 {
        self.dropped.to_server.load(Ordering::Relaxed)
    }

    /// Datagrams dropped on their way to the client.
    pub(crate) fn dropped_to_client(&self) -> u64 {
        self.dropped.to_client.load(Ordering::Relaxed)
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(front: UdpSocket, back: UdpSocket, every: u64, dropped: Arc<Dropped>) {
    let mut client = None;
    let (mut up, mut down) = (0u64, 0u64);
    let mut from_client = vec![0u8; 64 * 1024];
    let mut from_server = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            got = front.recv_from(&mut from_client) => {
                let Ok((n, peer)) = got else { continue };
                client = Some(peer);
                up += 1;
                if up % every == 0 {
                    dropped.to_server.fetch_add(1, Ordering::Relaxed);
                } else {
                    let _ = back.send(&from_client[..n]).await;
                }
            }
            got = back.recv(&mut from_server) => {
                let Ok(n) = got else { continue };
                let Some(peer) = client else { continue };
                down += 1;
                if down % every == 0 {
                    dropped.to_client.fetch_add(1, Ordering::Relaxed);
                } else {
                    let _ = front.send_to(&from_server[..n], peer).await;
                }
            }
        }
    }
}
