//! The QUIC transport against a small server in the test: noq with rustls and the protocol
//! core's `ServerConnection`, which numbers the streams in the order it accepts them (the
//! first is the control stream) and delivers on the stream of each subscription. It logs which
//! packets came on which stream.
//!
//! Covered: single-stream and multi-stream round trips at QoS 0/1/2, the control stream
//! carrying no PUBLISH or SUBSCRIBE in multi-stream mode, 0-RTT accepted on a reconnection
//! and replayed when refused, certificate errors (unknown CA, name mismatch, `insecure`), an
//! ALPN refusal, and a silent host reported as a timeout within the set-up limit (with and
//! without a session ticket).

use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mqttd_client::transport::{CertCheck, TlsError};
use mqttd_client::{
    connect_to, Client, ConnectError, Connector, Endpoint, Events, Transport, TransportError,
    ZeroRtt,
};
use mqttd_proto::client::ClientConfig;
use mqttd_proto::codec::PacketReader;
use mqttd_proto::server::{Accept, Event, ServerConfig, ServerConnection};
use mqttd_proto::session::{QueueLimits, Session};
use mqttd_proto::{
    ClientId, Delivery, Message, Packet, ProtocolVersion, QoS, ReasonCode, StreamId, TopicFilter,
    TopicName,
};
use noq::rustls;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A CA, a server certificate it signs for `localhost`, and an unrelated CA.
struct Pki {
    _dir: tempfile::TempDir,
    ca_file: PathBuf,
    other_ca_file: PathBuf,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
}

fn ca(name: &str) -> (rcgen::Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    (rcgen::Issuer::new(params, key), cert.pem())
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (issuer, ca_pem) = ca("quic");
        let (_, other_pem) = ca("other");
        let ca_file = dir.path().join("ca.pem");
        let other_ca_file = dir.path().join("other-ca.pem");
        std::fs::write(&ca_file, ca_pem).unwrap();
        std::fs::write(&other_ca_file, other_pem).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &issuer).unwrap();
        Self {
            _dir: dir,
            ca_file,
            other_ca_file,
            chain: vec![cert.der().clone()],
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        }
    }

    /// A QUIC server configuration with a fresh session cache (so tickets of an earlier one
    /// do not resume), 0-RTT on, ALPN `alpn`.
    fn server_config(&self, alpn: &[u8]) -> noq::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .unwrap();
        tls.alpn_protocols = vec![alpn.to_vec()];
        tls.max_early_data_size = u32::MAX;
        let crypto = noq::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).unwrap();
        noq::ServerConfig::with_crypto(Arc::new(crypto))
    }
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// What the server saw.
#[derive(Debug, Default)]
struct Log {
    /// Per connection: the packet kinds received on each stream.
    streams: Vec<HashMap<StreamId, BTreeSet<&'static str>>>,
}

struct Server {
    endpoint: noq::Endpoint,
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
}

impl Server {
    fn start(pki: &Pki, alpn: &[u8]) -> Self {
        let endpoint = noq::Endpoint::server(
            pki.server_config(alpn),
            SocketAddr::from(([127, 0, 0, 1], 0)),
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let (ep, l) = (endpoint.clone(), log.clone());
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let Ok(connecting) = incoming.accept() else {
                    continue;
                };
                let index = {
                    let mut log = l.lock().unwrap();
                    log.streams.push(HashMap::new());
                    log.streams.len() - 1
                };
                // A server may always use 0.5-RTT: it reads the client's 0-RTT data at once.
                let Ok((conn, _)) = connecting.into_0rtt() else {
                    continue;
                };
                tokio::spawn(serve(conn, l.clone(), index));
            }
        });
        Self {
            endpoint,
            addr,
            log,
        }
    }

    fn connection_streams(&self, index: usize) -> HashMap<StreamId, BTreeSet<&'static str>> {
        self.log.lock().unwrap().streams[index].clone()
    }
}

fn kind(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::PingReq => "PINGREQ",
        Packet::Disconnect(_) => "DISCONNECT",
        Packet::Auth(_) => "AUTH",
        _ => "other",
    }
}

/// Reads packets from one stream into the connection's channel; `None` at its end.
async fn read_stream(
    stream: StreamId,
    mut recv: noq::RecvStream,
    tx: mpsc::Sender<(StreamId, Option<Packet>)>,
) {
    let mut reader = PacketReader::new(1024 * 1024);
    let mut buf = BytesMut::new();
    let mut version = (!stream.is_control()).then_some(ProtocolVersion::V5);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
        while let Ok(Some(packet)) = reader.read(&mut buf, version) {
            version = Some(ProtocolVersion::V5);
            if tx.send((stream, Some(packet))).await.is_err() {
                return;
            }
        }
    }
    let _ = tx.send((stream, None)).await;
}

/// One connection: the protocol core's server with one subscriber, itself.
async fn serve(conn: noq::Connection, log: Arc<Mutex<Log>>, index: usize) {
    let (tx, mut rx) = mpsc::channel(64);
    let mut writers: HashMap<StreamId, noq::SendStream> = HashMap::new();
    let mut core = ServerConnection::new(ServerConfig::default(), Instant::now());
    let mut subscriptions: Vec<(TopicFilter, QoS, StreamId)> = Vec::new();
    let mut next = 0;
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => {
                let Ok((send, recv)) = accepted else { return };
                let stream = StreamId::new(next);
                next += 1;
                writers.insert(stream, send);
                tokio::spawn(read_stream(stream, recv, tx.clone()));
            }
            Some((stream, packet)) = rx.recv() => match packet {
                Some(packet) => {
                    log.lock().unwrap().streams[index]
                        .entry(stream)
                        .or_default()
                        .insert(kind(&packet));
                    core.handle_packet_on(Instant::now(), stream, packet);
                }
                None if stream.is_control() => core.connection_lost(Instant::now()),
                None => core.stream_lost(Instant::now(), stream),
            },
        }
        let now = Instant::now();
        while let Some((stream, event)) = core.poll_event_tagged() {
            match event {
                Event::Connect(request) => {
                    let id = request.connect.client_id.clone();
                    let session = Session::new(id, 0, QueueLimits::default());
                    let _ = core.accept(now, Accept::new(session, false));
                }
                Event::Subscribe(subscribe) => {
                    let mut reasons = Vec::new();
                    for s in subscribe.filters {
                        subscriptions.push((s.filter, s.options.qos, stream));
                        reasons.push(match s.options.qos {
                            QoS::AtMostOnce => ReasonCode::Success,
                            QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                            QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
                        });
                    }
                    let _ = core.subscribe_ack(subscribe.packet_id, reasons);
                }
                Event::Publish(publish) => {
                    if let Some(id) = publish.packet_id {
                        let _ = core.publish_ack(id, ReasonCode::Success);
                    }
                    let message = Arc::new(publish.message);
                    for (filter, qos, on) in &subscriptions {
                        if filter.matches(&message.topic) {
                            let mut delivery = Delivery::new(message.clone());
                            delivery.qos = delivery.qos.min(*qos);
                            let _ = core.deliver_on(now, *on, delivery);
                        }
                    }
                }
                Event::Closed { .. } => {
                    for send in writers.values_mut() {
                        let _ = send.finish();
                    }
                    return;
                }
                _ => {}
            }
        }
        while let Some((stream, packet)) = core.poll_transmit_tagged() {
            let mut buf = BytesMut::new();
            let _ = packet.encode(ProtocolVersion::V5, &mut buf);
            if let Some(send) = writers.get_mut(&stream) {
                let _ = send.write_all(&buf).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn endpoint(host: &str, port: u16, ca_file: &std::path::Path, data_streams: u16) -> Endpoint {
    let mut endpoint = Endpoint::new(Transport::Quic, host, port);
    endpoint.tls.ca_file = Some(ca_file.to_owned());
    endpoint.quic.data_streams = data_streams;
    endpoint
}

fn config(id: &str) -> ClientConfig {
    ClientConfig::new(ClientId::try_from(id).unwrap())
}

fn topic(t: &str) -> TopicName {
    TopicName::try_from(t).unwrap()
}

fn message(t: &str, qos: QoS, payload: &'static [u8]) -> Message {
    Message::new(topic(t), payload, qos, false)
}

async fn connect(connector: &Connector, id: &str) -> (Client, Events) {
    let (client, events, ack) = tokio::time::timeout(
        Duration::from_secs(20),
        connect_to(connector, config(id), None),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    assert_eq!(ack.reason, ReasonCode::Success);
    (client, events)
}

/// Receives `n` messages and returns their topics and payloads, sorted.
async fn receive(events: &mut Events, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    while got.len() < n {
        let p = tokio::time::timeout(Duration::from_secs(10), events.next_message())
            .await
            .expect("messages in time")
            .expect("connection open");
        got.push((
            p.message.topic.as_str().to_owned(),
            p.message.payload.to_vec(),
        ));
    }
    got.sort();
    got
}

async fn round_trip(client: &Client, events: &mut Events, prefix: &str) {
    let filter = TopicFilter::try_from(format!("{prefix}/#").as_str()).unwrap();
    client
        .subscribe_one(filter, QoS::ExactlyOnce)
        .await
        .unwrap();
    for (qos, payload) in [
        (QoS::AtMostOnce, b"zero" as &'static [u8]),
        (QoS::AtLeastOnce, b"one"),
        (QoS::ExactlyOnce, b"two"),
    ] {
        let _ = client
            .publish(message(&format!("{prefix}/x"), qos, payload))
            .await
            .unwrap();
    }
    let got = receive(events, 3).await;
    let payloads: Vec<&[u8]> = got.iter().map(|(_, p)| p.as_slice()).collect();
    assert_eq!(payloads, vec![b"one" as &[u8], b"two", b"zero"]);
}

fn transport_error(
    result: Result<(Client, Events, mqttd_proto::ConnAck), ConnectError>,
) -> TransportError {
    match result {
        Err(ConnectError::Transport(e)) => e,
        Err(other) => panic!("expected a transport error, got {other:?}"),
        Ok(_) => panic!("expected a transport error, connected"),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn single_stream_round_trip_at_every_qos() {
    let pki = Pki::new();
    let server = Server::start(&pki, b"mqtt");
    // `localhost` may resolve to ::1 first, where nothing listens: the addresses race.
    let connector =
        Connector::new(endpoint("localhost", server.addr.port(), &pki.ca_file, 0)).unwrap();
    let (client, mut events) = connect(&connector, "single").await;
    assert_eq!(client.quic().unwrap().zero_rtt(), ZeroRtt::NotAttempted);
    round_trip(&client, &mut events, "s").await;
    client.disconnect(ReasonCode::Success, None).await.unwrap();
    let streams = server.connection_streams(0);
    assert_eq!(streams.len(), 1, "one stream: {streams:?}");
    assert!(
        streams[&StreamId::CONTROL].contains("DISCONNECT"),
        "{streams:?}"
    );
}

#[tokio::test]
async fn multi_stream_spreads_topics_and_keeps_the_control_stream_for_control() {
    let pki = Pki::new();
    let server = Server::start(&pki, b"mqtt");
    let connector =
        Connector::new(endpoint("localhost", server.addr.port(), &pki.ca_file, 3)).unwrap();
    let (client, mut events) = connect(&connector, "multi").await;
    let topics: Vec<String> = (0..12).map(|i| format!("m/{i}")).collect();
    for t in &topics {
        let filter = TopicFilter::try_from(t.as_str()).unwrap();
        client
            .subscribe_one(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
    }
    for (i, t) in topics.iter().enumerate() {
        let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][i % 3];
        let _ = client.publish(message(t, qos, b"x")).await.unwrap();
    }
    let got = receive(&mut events, topics.len()).await;
    let mut expected: Vec<String> = topics.clone();
    expected.sort();
    assert_eq!(
        got.into_iter().map(|(t, _)| t).collect::<Vec<_>>(),
        expected
    );
    client.disconnect(ReasonCode::Success, None).await.unwrap();

    let streams = server.connection_streams(0);
    let control = &streams[&StreamId::CONTROL];
    assert!(
        control.contains("CONNECT") && control.contains("DISCONNECT"),
        "{streams:?}"
    );
    assert!(
        !control.contains("PUBLISH") && !control.contains("SUBSCRIBE"),
        "the control stream carries no data: {streams:?}"
    );
    let data: Vec<_> = streams
        .iter()
        .filter(|(s, kinds)| !s.is_control() && kinds.contains("PUBLISH"))
        .collect();
    assert!(
        data.len() >= 2,
        "12 topics over 3 streams use more than one: {streams:?}"
    );
    assert!(streams.len() <= 4, "{streams:?}");
}

#[tokio::test]
async fn a_reconnection_sends_connect_as_accepted_0rtt_data() {
    let pki = Pki::new();
    let server = Server::start(&pki, b"mqtt");
    let connector =
        Connector::new(endpoint("localhost", server.addr.port(), &pki.ca_file, 0)).unwrap();
    let (client, mut events) = connect(&connector, "first").await;
    // A round trip: the session tickets have arrived by then.
    round_trip(&client, &mut events, "a").await;
    client.disconnect(ReasonCode::Success, None).await.unwrap();

    let (client, mut events) = connect(&connector, "second").await;
    assert_eq!(client.quic().unwrap().zero_rtt(), ZeroRtt::Accepted);
    // The server's side of the handshake said so: its TLS session took the early data.
    round_trip(&client, &mut events, "b").await;
    client.disconnect(ReasonCode::Success, None).await.unwrap();
}

#[tokio::test]
async fn refused_0rtt_data_is_sent_again_after_the_handshake() {
    let pki = Pki::new();
    let server = Server::start(&pki, b"mqtt");
    let connector =
        Connector::new(endpoint("localhost", server.addr.port(), &pki.ca_file, 2)).unwrap();
    let (client, mut events) = connect(&connector, "first").await;
    round_trip(&client, &mut events, "a").await;
    client.disconnect(ReasonCode::Success, None).await.unwrap();
    // As after a restart: the server no longer knows the ticket.
    server
        .endpoint
        .set_server_config(Some(pki.server_config(b"mqtt")));
    let (client, mut events) = connect(&connector, "second").await;
    assert_eq!(client.quic().unwrap().zero_rtt(), ZeroRtt::Rejected);
    round_trip(&client, &mut events, "b").await;
    client.disconnect(ReasonCode::Success, None).await.unwrap();
    let streams = server.connection_streams(1);
    assert!(
        streams[&StreamId::CONTROL].contains("CONNECT"),
        "{streams:?}"
    );
}

#[tokio::test]
async fn certificate_errors_name_their_check() {
    let pki = Pki::new();
    let server = Server::start(&pki, b"mqtt");
    let port = server.addr.port();

    let connector = Connector::new(endpoint("localhost", port, &pki.other_ca_file, 0)).unwrap();
    let e = transport_error(connect_to(&connector, config("c"), None).await);
    assert!(
        matches!(&e, TransportError::Tls(t) if t.cert_check() == Some(CertCheck::UnknownIssuer)),
        "{e}"
    );

    // The certificate names `localhost` only.
    let connector = Connector::new(endpoint("127.0.0.1", port, &pki.ca_file, 0)).unwrap();
    let e = transport_error(connect_to(&connector, config("c"), None).await);
    assert!(
        matches!(&e, TransportError::Tls(t) if t.cert_check() == Some(CertCheck::NameMismatch)),
        "{e}"
    );

    let mut insecure = endpoint("127.0.0.1", port, &pki.ca_file, 0);
    insecure.tls.insecure = true;
    let (client, _events) = connect(&Connector::new(insecure).unwrap(), "c").await;
    client.disconnect(ReasonCode::Success, None).await.unwrap();
}

#[tokio::test]
async fn a_server_without_the_mqtt_alpn_refuses_the_handshake() {
    let pki = Pki::new();
    let server = Server::start(&pki, b"h3");
    let connector =
        Connector::new(endpoint("localhost", server.addr.port(), &pki.ca_file, 0)).unwrap();
    let e = transport_error(connect_to(&connector, config("c"), None).await);
    assert!(matches!(&e, TransportError::Tls(TlsError::Alert(_))), "{e}");
}

#[tokio::test]
async fn a_silent_host_times_out_within_the_limit() {
    let pki = Pki::new();
    // Bound, so nothing else gets the port, and never answering.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut e = endpoint(
        "localhost",
        silent.local_addr().unwrap().port(),
        &pki.ca_file,
        0,
    );
    e.timeout = Duration::from_millis(500);
    let connector = Connector::new(e).unwrap();
    let started = Instant::now();
    let e = transport_error(connect_to(&connector, config("c"), None).await);
    assert!(matches!(e, TransportError::Timeout { .. }), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_silent_host_times_out_after_0rtt_data_too() {
    let pki = Pki::new();
    let server = Server::start(&pki, b"mqtt");
    let mut e = endpoint("localhost", server.addr.port(), &pki.ca_file, 0);
    e.timeout = Duration::from_millis(800);
    let connector = Connector::new(e).unwrap();
    let (client, mut events) = connect(&connector, "first").await;
    round_trip(&client, &mut events, "a").await;
    client.disconnect(ReasonCode::Success, None).await.unwrap();
    // The server goes away; its ticket stays cached, so CONNECT goes out as 0-RTT data.
    server.endpoint.close(0u32.into(), b"");
    server.endpoint.wait_idle().await;
    drop(server);
    let started = Instant::now();
    let result = connect_to(&connector, config("second"), None).await;
    let e = transport_error(result);
    assert!(matches!(e, TransportError::Timeout { .. }), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
