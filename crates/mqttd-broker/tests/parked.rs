//! Idle TCP connections are parked without a task of their own (`drivers::park`) and must
//! behave exactly as active ones: deliveries reach a parked subscriber, a parked client that
//! goes silent is timed out by keep alive, one that closes its socket publishes its will, a
//! parked session can be taken over, shutdown sends DISCONNECT to parked clients, and many
//! parked clients woken at once all get their task back.
//!
//! Each test first waits until the broker counts the connections as parked
//! (`connections_parked`), so that what follows happens to parked connections.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mqttd_broker::{Broker, Config, ListenerKind};
use mqttd_client::{connect_tcp, Client, Events};
use mqttd_proto::client::{ClientConfig, Event};
use mqttd_proto::{
    ClientId, Connect, ConnectProperties, Message, Packet, ProtocolVersion, QoS, ReasonCode,
    TopicFilter, TopicName, Will, WillProperties,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

mod common;
use common::WAIT;

async fn start() -> (Broker, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.listen = vec!["tcp://127.0.0.1:0".into()];
    config.data_dir = dir.path().join("data");
    let broker = Broker::builder(config).start().await.unwrap();
    let addr = broker.addr(ListenerKind::Tcp).unwrap();
    (broker, addr, dir)
}

fn config(id: &str) -> ClientConfig {
    ClientConfig::new(ClientId::try_from(id).unwrap())
}

async fn client(addr: SocketAddr, config: ClientConfig) -> (Client, Events) {
    let (c, e, _) = connect_tcp(addr, config, None).await.unwrap();
    (c, e)
}

fn msg(topic: &str, payload: &str, qos: QoS) -> Message {
    Message::new(
        TopicName::try_from(topic).unwrap(),
        payload.as_bytes().to_vec(),
        qos,
        false,
    )
}

fn filter(f: &str) -> TopicFilter {
    TopicFilter::try_from(f).unwrap()
}

/// Waits until the broker counts `n` parked connections.
async fn parked(broker: &Broker, n: i64) {
    let counted = async {
        while broker.metrics().connections_parked.get() != n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    timeout(WAIT, counted)
        .await
        .unwrap_or_else(|_| panic!("{n} connections never parked"));
}

/// The next Closed event: its reason and whether the server ended the connection.
async fn closed(events: &mut Events) -> (ReasonCode, bool) {
    loop {
        match timeout(WAIT, events.recv()).await.unwrap() {
            Some(Event::Closed { reason, by_server }) => return (reason, by_server),
            Some(_) => {}
            None => panic!("connection ended without a Closed event"),
        }
    }
}

/// A raw MQTT 5 connection with `keep_alive` and a will on `will/{id}`, past its CONNACK.
async fn raw_with_will(addr: SocketAddr, id: &str, keep_alive: u16) -> TcpStream {
    let connect = Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        clean_start: true,
        keep_alive,
        client_id: ClientId::try_from(id).unwrap(),
        will: Some(Will {
            topic: TopicName::try_from(format!("will/{id}").as_str()).unwrap(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: WillProperties::default(),
        }),
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }));
    let mut buf = BytesMut::new();
    connect.encode(ProtocolVersion::V5, &mut buf).unwrap();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&buf).await.unwrap();
    // CONNACK: type 2, then a short remaining length.
    let mut head = [0u8; 2];
    timeout(WAIT, stream.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head[0], 0x20, "CONNACK");
    let mut rest = vec![0u8; usize::from(head[1])];
    timeout(WAIT, stream.read_exact(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest.get(1), Some(&0), "accepted");
    stream
}

/// Waits for the will of `id` at `events`.
async fn will_of(events: &mut Events, id: &str) {
    let message = timeout(WAIT, events.next_message())
        .await
        .unwrap()
        .expect("the will");
    assert_eq!(message.message.topic.as_str(), format!("will/{id}"));
}

#[tokio::test]
async fn a_parked_subscriber_gets_each_delivery_and_parks_again() {
    let (broker, addr, _dir) = start().await;
    let (sub, mut sub_events) = client(addr, config("sub")).await;
    sub.subscribe_one(filter("t"), QoS::AtLeastOnce)
        .await
        .unwrap();
    parked(&broker, 1).await;
    let (publisher, _pub_events) = client(addr, config("pub")).await;
    for round in 0..3 {
        // Both idle: the delivery wakes the subscriber from the lot.
        parked(&broker, 2).await;
        let payload = format!("m{round}");
        let _ = publisher
            .publish(msg("t", &payload, QoS::AtLeastOnce))
            .await
            .unwrap();
        let got = timeout(WAIT, sub_events.next_message())
            .await
            .unwrap()
            .expect("delivery");
        assert_eq!(&got.message.payload[..], payload.as_bytes());
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn a_parked_client_that_goes_silent_is_timed_out_and_its_will_goes_out() {
    let (broker, addr, _dir) = start().await;
    let (watcher, mut events) = client(addr, config("watcher")).await;
    watcher
        .subscribe_one(filter("will/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    // Keep alive 2 s: timed out at 3 s, well after it parks.
    let mut silent = raw_with_will(addr, "silent", 2).await;
    parked(&broker, 2).await;
    will_of(&mut events, "silent").await;
    // The broker closed it: DISCONNECT 0x8D, then the end of the stream.
    let mut rest = Vec::new();
    timeout(WAIT, silent.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest.first(), Some(&0xE0), "DISCONNECT: {rest:?}");
    assert!(rest.contains(&0x8D), "keep alive timeout: {rest:?}");
    broker.shutdown().await;
}

#[tokio::test]
async fn a_parked_client_that_closes_its_socket_publishes_its_will() {
    let (broker, addr, _dir) = start().await;
    let (watcher, mut events) = client(addr, config("watcher")).await;
    watcher
        .subscribe_one(filter("will/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let gone = raw_with_will(addr, "gone", 60).await;
    parked(&broker, 2).await;
    drop(gone);
    will_of(&mut events, "gone").await;
    let open = async {
        while broker.metrics().connections_open.get() != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    timeout(WAIT, open)
        .await
        .expect("the closed connection is counted out");
    broker.shutdown().await;
}

#[tokio::test]
async fn a_parked_session_is_taken_over_with_its_subscriptions() {
    let (broker, addr, _dir) = start().await;
    let mut persistent = config("device");
    persistent.session_expiry_interval = 300;
    let (old, mut old_events) = client(addr, persistent.clone()).await;
    old.subscribe_one(filter("cmd/device"), QoS::AtLeastOnce)
        .await
        .unwrap();
    parked(&broker, 1).await;
    persistent.clean_start = false;
    let (_new, mut new_events, ack) = connect_tcp(addr, persistent, None).await.unwrap();
    assert!(
        ack.session_present,
        "the session moved to the new connection"
    );
    assert_eq!(
        closed(&mut old_events).await,
        (ReasonCode::SessionTakenOver, true)
    );
    let (publisher, _pub_events) = client(addr, config("pub")).await;
    let _ = publisher
        .publish(msg("cmd/device", "on", QoS::AtLeastOnce))
        .await
        .unwrap();
    let got = timeout(WAIT, new_events.next_message())
        .await
        .unwrap()
        .expect("delivery on the new connection");
    assert_eq!(&got.message.payload[..], b"on");
    broker.shutdown().await;
}

#[tokio::test]
async fn shutdown_sends_server_shutting_down_to_parked_clients() {
    let (broker, addr, _dir) = start().await;
    let (_a, mut a_events) = client(addr, config("a")).await;
    let (_b, mut b_events) = client(addr, config("b")).await;
    parked(&broker, 2).await;
    let shutdown = tokio::spawn(broker.shutdown());
    for events in [&mut a_events, &mut b_events] {
        assert_eq!(closed(events).await, (ReasonCode::ServerShuttingDown, true));
    }
    timeout(WAIT, shutdown).await.unwrap().unwrap();
}

#[tokio::test]
async fn more_parked_clients_than_one_batch_of_events_all_get_their_answer() {
    // More than the lot takes from its epoll set at a time (256), all ready at once.
    const CLIENTS: usize = 300;
    let (broker, addr, _dir) = start().await;
    let mut streams = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        streams.push(raw_with_will(addr, &format!("many{i}"), 300).await);
    }
    parked(&broker, CLIENTS as i64).await;
    // PINGREQ on every socket, then a PINGRESP from each.
    for stream in &mut streams {
        stream.write_all(&[0xC0, 0x00]).await.unwrap();
    }
    for stream in &mut streams {
        let mut resp = [0u8; 2];
        timeout(WAIT, stream.read_exact(&mut resp))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp, [0xD0, 0x00], "PINGRESP");
    }
    // And they park again.
    parked(&broker, CLIENTS as i64).await;
    broker.shutdown().await;
}
