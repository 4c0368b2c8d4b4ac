//! Bridges of an embedded broker: a transport plugged in for a scheme of the program's own (as
//! `p2p://` will be), the bridge's session trusted whatever the `authorize` hook says, a URL
//! nobody serves refused at startup, and a remote broker that refuses Mosquitto's bridge flag
//! asked again without it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mqttd_broker::bridge::BridgeTransport;
use mqttd_broker::{
    Action, Bridge, BridgeUrl, Broker, ClientInfo, Config, Hooks, Intercept, ListenerKind,
    OpenStream, StartError, Transport, Verdict,
};
use mqttd_client::{connect_tcp, Client, Events};
use mqttd_proto::client::ClientConfig;
use mqttd_proto::{ClientId, Message, ProtocolVersion, QoS, TopicFilter, TopicName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A hang bound, never a performance verdict.
const LIMIT: Duration = Duration::from_secs(30);

/// A broker on an ephemeral port, in memory, its data directory (the SCRAM secret) in `dir`.
fn config(dir: &tempfile::TempDir) -> Config {
    let mut config = Config::default();
    config.listen = vec!["tcp://127.0.0.1:0".into()];
    config.data_dir = dir.path().to_owned();
    config.persistence = false;
    config.allow_anonymous = Some(true);
    config
}

async fn client(addr: SocketAddr, id: &str) -> (Client, Events) {
    let config = ClientConfig::new(ClientId::try_from(id).unwrap());
    let (c, e, _) = connect_tcp(addr, config, None).await.unwrap();
    (c, e)
}

async fn subscriber(addr: SocketAddr, id: &str, filter: &str) -> (Client, Events) {
    let (c, e) = client(addr, id).await;
    let ack = c
        .subscribe_one(TopicFilter::try_from(filter).unwrap(), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(!ack.reasons[0].is_error(), "{ack:?}");
    (c, e)
}

/// Publishes `payload` on `topic` until `sub` receives it (the bridge subscribes after it
/// connects); returns the topic it arrived on.
async fn crosses(publisher: &Client, topic: &str, payload: &str, sub: &mut Events) -> String {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{payload} never crossed"
        );
        let m = Message::new(
            TopicName::try_from(topic).unwrap(),
            payload.as_bytes().to_vec(),
            QoS::AtMostOnce,
            false,
        );
        let _sent = publisher.publish(m).await.unwrap();
        let arrived = tokio::time::timeout(Duration::from_millis(300), async {
            // Skipping what else the subscriber gets (the other test's messages).
            while let Some(m) = sub.next_message().await {
                if &m.message.payload[..] == payload.as_bytes() {
                    return Some(m.message.topic.as_str().to_owned());
                }
            }
            None
        });
        if let Ok(Some(topic)) = arrived.await {
            return topic;
        }
    }
}

/// Opens TCP connections to one address, whatever the URL says.
struct Loopback(SocketAddr);

impl BridgeTransport for Loopback {
    fn open<'a>(&'a self, _bridge: &'a Bridge, url: &'a BridgeUrl) -> OpenStream<'a> {
        assert_eq!(url.scheme(), "mem");
        Box::pin(async move {
            let stream = TcpStream::connect(self.0).await?;
            Ok(Box::new(stream) as Box<dyn mqttd_client::transport::ByteStream>)
        })
    }
}

/// Denies every client whose identifier does not start with `ok-`, and records the
/// transports of what is published.
#[derive(Default, Clone)]
struct Strict(Arc<Mutex<Vec<(String, Transport)>>>);

impl Hooks for Strict {
    fn authorize(&self, client: &ClientInfo, _action: Action, _topic: &str) -> Verdict {
        if client.client_id.as_str().starts_with("ok-") {
            Verdict::Defer
        } else {
            Verdict::Deny(mqttd_proto::ReasonCode::NotAuthorized)
        }
    }

    fn on_publish(&self, client: &ClientInfo, message: &mut Message) -> Intercept {
        self.0
            .lock()
            .unwrap()
            .push((message.topic.as_str().to_owned(), client.peer.transport));
        Intercept::Continue
    }
}

#[tokio::test]
async fn a_plugged_transport_serves_its_scheme_and_the_bridge_is_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let config = || config(&dir);
    let remote = Broker::builder(config()).start().await.unwrap();
    let remote_addr = remote.addr(ListenerKind::Tcp).unwrap();

    let mut local_config = config();
    let bridge = Bridge::new("plug", &["mem://remote"], &["a/# both 1 l/ r/"]).unwrap();
    local_config.bridge = vec![bridge];
    let hooks = Strict::default();
    let local = Broker::builder(local_config)
        .hooks(hooks.clone())
        .bridge_transport("MEM", Loopback(remote_addr))
        .start()
        .await
        .unwrap();
    let local_addr = local.addr(ListenerKind::Tcp).unwrap();

    let (l_pub, _l_pub_events) = client(local_addr, "ok-pub").await;
    let (r_pub, _r_pub_events) = client(remote_addr, "r-pub").await;
    let (_l, mut l_sub) = subscriber(local_addr, "ok-sub", "l/#").await;
    let (_r, mut r_sub) = subscriber(remote_addr, "r-sub", "r/#").await;
    assert_eq!(crosses(&l_pub, "l/a/1", "out", &mut r_sub).await, "r/a/1");
    assert_eq!(crosses(&r_pub, "r/a/2", "in", &mut l_sub).await, "l/a/2");
    // The hook denies everyone but `ok-` clients; the bridge received and published anyway,
    // and its publication was seen as the bridge's.
    let seen = hooks.0.lock().unwrap().clone();
    assert!(
        seen.contains(&("l/a/2".to_owned(), Transport::Bridge)),
        "{seen:?}"
    );
    let metrics = local.metrics().render();
    assert!(
        metrics.contains("mqttd_bridge_up{bridge=\"plug\"} 1"),
        "{metrics}"
    );
    local.shutdown().await;
    remote.shutdown().await;

    // Without the transport, the scheme has no server: the broker does not start.
    let mut local_config = config();
    local_config.bridge = vec![Bridge::new("plug", &["mem://remote"], &["a/#"]).unwrap()];
    match Broker::builder(local_config).start().await {
        Err(StartError::Bridge { bridge, reason }) => {
            assert_eq!(bridge, "plug");
            assert!(reason.contains("mem://remote"), "{reason}");
        }
        Err(other) => panic!("failed otherwise: {other}"),
        Ok(_) => panic!("started without a transport for mem://"),
    }
}

/// Reads one CONNECT from `stream` and returns its protocol level.
async fn connect_level(stream: &mut TcpStream) -> u8 {
    // Fixed header (one-byte remaining length for so short a CONNECT), `00 04 MQTT`, level.
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], 0x10, "a CONNECT");
    let mut rest = vec![0u8; usize::from(head[1]) - 7];
    stream.read_exact(&mut rest).await.unwrap();
    head[8]
}

#[tokio::test]
async fn a_broker_that_refuses_the_bridge_flag_is_asked_again_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("mqtt://127.0.0.1:{}", server.local_addr().unwrap().port());
    let mut bridge = Bridge::new("old", &[&url], &["a/# out 1"]).unwrap();
    bridge.protocol = ProtocolVersion::V3_1_1;
    bridge.client_id = ClientId::try_from("edge").unwrap();
    let mut local_config = config(&dir);
    local_config.bridge = vec![bridge];
    let local = Broker::builder(local_config).start().await.unwrap();

    let (mut first, _) = tokio::time::timeout(LIMIT, server.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connect_level(&mut first).await, 0x84, "try_private first");
    // What a broker that does not know the flag answers: unacceptable protocol version.
    first.write_all(&[0x20, 0x02, 0x00, 0x01]).await.unwrap();
    drop(first);
    let (mut second, _) = tokio::time::timeout(LIMIT, server.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connect_level(&mut second).await, 0x04, "then plain 3.1.1");
    second.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !local
        .metrics()
        .render()
        .contains("mqttd_bridge_up{bridge=\"old\"} 1")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bridge never came up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    local.shutdown().await;
    // The bridge said goodbye at shutdown.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(LIMIT, second.read_to_end(&mut rest)).await;
    assert_eq!(rest.first(), Some(&0xE0), "DISCONNECT: {rest:?}");
}
