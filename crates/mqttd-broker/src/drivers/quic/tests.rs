//! The stream scheduling of the QUIC driver, over a real noq connection on loopback: a
//! connected core, its streams, and [`Streams::poll_io`] and [`handle_io`] driven by hand.
//! Verdicts are counts and bounds.

use std::time::Duration;

use bytes::{BufMut, Bytes};
use noq::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use noq::{Endpoint, TransportConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use mqttd_proto::{
    ClientId, Connect, ConnectProperties, Packet, PacketId, ProtocolVersion, Publish,
    PublishProperties, QoS, Subscribe, SubscribeProperties, Subscription, SubscriptionOptions,
    TopicFilter, TopicName,
};

use super::*;
use crate::core::Request;
use crate::hooks::Transport;
use crate::storage::MemoryStorage;

/// Upper bound for anything that must happen; only a hang reaches it.
const WAIT: Duration = Duration::from_secs(30);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A QUIC connection on loopback: the server's end, with `transport`, and the client's.
async fn pair(transport: TransportConfig) -> (Connection, Connection, Vec<Endpoint>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = CertificateDer::from(certified.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    tls.alpn_protocols = vec![b"mqtt".to_vec()];
    let mut config =
        noq::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).unwrap()));
    config.transport_config(Arc::new(transport));
    let server = Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"mqtt".to_vec()];
    let client = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client.set_default_client_config(noq::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    )));
    let connecting = client
        .connect(server.local_addr().unwrap(), "localhost")
        .unwrap();
    let (accepted, connected) = tokio::join!(
        async { server.accept().await.unwrap().await.unwrap() },
        connecting
    );
    (accepted, connected.unwrap(), vec![server, client])
}

fn encode(packet: &Packet) -> BytesMut {
    let mut buf = BytesMut::new();
    packet.encode(ProtocolVersion::V5, &mut buf).unwrap();
    buf
}

/// A core that accepted a clean MQTT 5 CONNECT and has its CONNACK in the control stream's
/// output.
async fn connected(inner: &Arc<Inner>) -> Box<ConnectionCore> {
    let peer = Peer::new(
        Transport::Quic,
        ([127, 0, 0, 1], 14567).into(),
        Arc::from("test"),
    );
    let (mut core, _span) = super::super::open(inner, peer, now());
    let connect = Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        clean_start: true,
        keep_alive: 0,
        client_id: ClientId::try_from("c").unwrap(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }));
    core.handle_input(now(), StreamId::CONTROL, &mut encode(&connect));
    core.process(now());
    while let Some(request) = core.poll_request() {
        assert!(matches!(request, Request::AcquireSession(_)));
        answer(inner, &mut core, request).await;
        core.process(now());
    }
    assert!(core.wants_read(StreamId::new(4)), "connected");
    core
}

/// The server's streams once the client has opened `count` (the control stream among them).
async fn accept(conn: &Connection, count: usize, budget: ReadBudget) -> Streams {
    let mut streams = Streams::new(budget);
    for _ in 0..count {
        let (send, recv) = timeout(conn.accept_bi()).await.unwrap();
        streams.add(Stream::new(StreamId::new(u64::from(send.id())), send, recv));
    }
    streams
}

async fn timeout<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(WAIT, f).await.expect("in time")
}

/// Two data streams that both have a lot to send, sharing a connection send window that takes
/// one write at a time: the writes alternate between them.
#[tokio::test]
async fn data_streams_with_much_to_send_take_turns() {
    let mut transport = TransportConfig::default();
    // Every write takes what the window has room for, until acknowledgements make more: then
    // both streams can be written, and which is decides who gets the connection.
    transport.send_window(4096);
    let (server, client, _endpoints) = pair(transport).await;
    let inner = Inner::for_tests(Config::default(), Arc::new(MemoryStorage::default()));
    let mut core = connected(&inner).await;

    let (a, b) = (StreamId::new(4), StreamId::new(8));
    // The client opens the control stream and two data streams and subscribes on each.
    let mut opened = Vec::new();
    for (stream, topic) in [(StreamId::CONTROL, ""), (a, "a"), (b, "b")] {
        let (mut send, recv) = client.open_bi().await.unwrap();
        assert_eq!(u64::from(send.id()), stream.get());
        // PINGREQ, so that the broker sees the stream.
        send.write_all(&[0xc0, 0]).await.unwrap();
        opened.push((send, recv));
        if topic.is_empty() {
            continue;
        }
        let subscribe = Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(1).unwrap(),
            properties: SubscribeProperties::default(),
            filters: vec![Subscription {
                filter: TopicFilter::try_from(topic).unwrap(),
                options: SubscriptionOptions::default(),
            }],
        });
        core.handle_input(now(), stream, &mut encode(&subscribe));
        core.process(now());
    }
    let mut streams = accept(&server, 3, ReadBudget::new(&inner.config)).await;

    // 60 messages of 1 KiB for each subscription, sent by the client itself.
    for i in 0..120 {
        let publish = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: TopicName::try_from(if i % 2 == 0 { "a" } else { "b" }).unwrap(),
            packet_id: None,
            properties: PublishProperties::default(),
            payload: Bytes::from(vec![0u8; 1024]),
        });
        core.handle_input(now(), StreamId::CONTROL, &mut encode(&publish));
    }
    core.process(now());
    let inbox = core.mailbox().take();
    core.handle_inbox(now(), inbox);
    core.process(now());
    for stream in [a, b] {
        let queued = core.output(stream).map_or(0, |o| o.writable().len());
        assert!(queued > 60 * 1024, "{stream}: {queued} bytes to send");
    }

    // The first 12 writes on data streams, each at most a window's worth.
    let mut writes = [0usize; 2];
    while writes.iter().sum::<usize>() < 12 {
        let io = timeout(poll_fn(|cx| streams.poll_io(cx, &core))).await;
        match io {
            Io::Wrote(id, Ok(n)) => {
                if id == a {
                    writes[0] += 1;
                } else if id == b {
                    writes[1] += 1;
                }
                core.wrote(id, n);
            }
            Io::Wrote(id, Err(error)) => panic!("{id}: {error}"),
            // The PINGREQ each stream was opened with.
            Io::Read(..) => handle_io(&mut core, &mut streams, &server, io),
        }
        core.process(now());
    }
    assert!(
        writes.iter().all(|&n| n >= 5),
        "writes on the two data streams: {writes:?}"
    );
    drop(opened);
}

/// A PUBLISH of `len` bytes in all, `header` included: its fixed header, topic `t` and a
/// payload of zeros.
fn large_publish(len: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(len);
    // Type PUBLISH, QoS 0; remaining length in three bytes; topic "t"; no properties.
    let remaining = len - 4;
    buf.put_u8(0x30);
    buf.put_u8((remaining & 0x7f) as u8 | 0x80);
    buf.put_u8(((remaining >> 7) & 0x7f) as u8 | 0x80);
    buf.put_u8((remaining >> 14) as u8);
    buf.put_slice(&[0, 1, b't', 0]);
    buf.resize(len, 0);
    buf
}

/// A client that opens many data streams and sends most of a large packet on each does not make
/// the broker hold much more than one packet's worth: past the budget, only the stream holding
/// the most is read, until it ends; then the next.
#[tokio::test]
async fn many_streams_holding_parts_of_packets_stay_within_the_read_budget() {
    const MAX_PACKET: usize = 64 * 1024;
    const PART: usize = 48 * 1024;
    const DATA_STREAMS: usize = 8;
    let mut transport = TransportConfig::default();
    // Room for every part in QUIC's buffers, so that all are there before the first read.
    transport.stream_receive_window(VarInt::from_u32(MAX_PACKET as u32));
    transport.receive_window(VarInt::from_u32(4 << 20));
    let (server, client, _endpoints) = pair(transport).await;
    let config = Config {
        max_packet_size: MAX_PACKET as u32,
        ..Config::default()
    };
    let inner = Inner::for_tests(config, Arc::new(MemoryStorage::default()));
    let mut core = connected(&inner).await;
    // The control stream's output (CONNACK) is not what this is about.
    let connack = core
        .output(StreamId::CONTROL)
        .map_or(0, |o| o.writable().len());
    core.wrote(StreamId::CONTROL, connack);

    // The budget with the windows above: every stream but one may wait.
    let budget = ReadBudget::with(MAX_PACKET as u32, 4 << 20, MAX_PACKET as u32);
    assert!(budget.max_waiting >= DATA_STREAMS);
    let sending = tokio::spawn(async move {
        let (_control, _) = client.open_bi().await.unwrap();
        let mut sent = Vec::new();
        for _ in 0..DATA_STREAMS {
            let (mut send, recv) = client.open_bi().await.unwrap();
            let packet = large_publish(MAX_PACKET - 1024);
            send.write_all(&packet[..PART]).await.unwrap();
            send.finish().unwrap();
            sent.push((send, recv));
        }
        // Until the broker's QUIC acknowledged every byte of every stream.
        for (send, _) in &sent {
            send.stopped().await.unwrap();
        }
        (client, _control, sent)
    });
    let mut streams = accept(&server, 1 + DATA_STREAMS, budget).await;
    let _client = timeout(sending).await.unwrap();

    let mut most = 0;
    let mut reads = 0;
    while streams.list.len() > 1 {
        let io = timeout(poll_fn(|cx| streams.poll_io(cx, &core))).await;
        assert!(matches!(io, Io::Read(..)), "nothing to write");
        handle_io(&mut core, &mut streams, &server, io);
        core.process(now());
        reads += 1;
        most = most.max(streams.held());
    }
    // Without the budget all parts are held at once before the first stream ends.
    assert!(
        most >= MAX_PACKET,
        "the budget was reached: at most {most} bytes held, in {reads} reads"
    );
    assert!(
        most <= MAX_PACKET + 2 * PART,
        "at most {most} bytes held, in {reads} reads; {} sent",
        DATA_STREAMS * PART
    );
    assert!(!core.is_closed());
}

/// Past the budget, the streams the core wants read are read in the order of what they hold,
/// while as many wait as the connection's receive window leaves room for.
#[test]
fn the_read_budget_lets_as_many_streams_wait_as_the_receive_window_allows() {
    // Defaults: a 2 MiB connection window and 256 KiB stream windows: 7 may wait (1.75 MiB).
    let defaults = ReadBudget::new(&Config::default());
    assert_eq!(defaults.limit, Config::default().max_packet_size as usize);
    assert_eq!(defaults.max_waiting, 7);
    // A connection window with room for every stream's: all may wait.
    assert_eq!(
        ReadBudget::with(1 << 20, 8 << 20, 64 << 10).max_waiting,
        112
    );
    // No stream window: nothing can be sent on a stream anyway.
    assert_eq!(
        ReadBudget::with(1 << 20, 8 << 20, 0).max_waiting,
        usize::MAX
    );
}
