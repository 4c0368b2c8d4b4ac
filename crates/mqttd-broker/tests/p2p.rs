//! The `p2p://` listener (feature `p2p`): mqttd-p2p nodes on loopback dial the broker's node
//! id and speak MQTT over the connection, as over `quic://`: single-stream through the async
//! client, multi-stream packet by packet; directly (given the node's address) and through the
//! broker's own `relay://` listener (given nothing but the relay); the node id as the user
//! name the ACL applies to; `p2p.allow` refusing a node it does not list; DISCONNECT at
//! shutdown.

mod common;

use std::path::Path;

use mqttd_broker::{Broker, Config, ListenerKind};
use mqttd_client::{connect, Client, Events};
use mqttd_p2p::{Connection, ConnectionError, Node, NodeAddr, NodeConfig, NodeKey, RelayUrl};
use mqttd_proto::client::Event;
use mqttd_proto::{Message, Packet, QoS, ReasonCode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::time::timeout;

use common::quic::{config, connect_packet, filter, id, publish_packet, topic, Raw};
use common::{next_payload, WAIT};

const MQTT: &[u8] = b"mqtt";

/// A broker with `listen` and `config`'s other settings, its data in `dir`.
async fn start(dir: &Path, listen: &[&str], mut config: Config) -> Broker {
    config.listen = listen.iter().map(|l| (*l).to_owned()).collect();
    config.data_dir = dir.join("data");
    Broker::builder(config).start().await.unwrap()
}

/// The value of the metric line that starts with `name` (labels included).
fn metric(broker: &Broker, name: &str) -> u64 {
    let text = broker.metrics().render();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Waits until the metric `name` reaches `at_least` (the traversal metrics are counted by a
/// task of each connection), and returns it.
async fn metric_reaches(broker: &Broker, name: &str, at_least: u64) -> u64 {
    let reached = async {
        loop {
            let value = metric(broker, name);
            if value >= at_least {
                return value;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    timeout(WAIT, reached)
        .await
        .unwrap_or_else(|_| panic!("{name} below {at_least}: {}", metric(broker, name)))
}

/// A client node on loopback with `key`; with `relay`, through it only (no direct paths).
async fn client_node(key: NodeKey, relay: Option<(&RelayUrl, &Path)>) -> Node {
    let mut config = NodeConfig::new(key);
    config.bind = vec!["127.0.0.1:0".parse().unwrap()];
    if let Some((url, ca)) = relay {
        config.relays = vec![url.clone()];
        config.relay_roots = vec![CertificateDer::from_pem_file(ca).unwrap()];
        config.webpki_roots = false;
        config.direct_paths = false;
    }
    Node::bind(config).await.unwrap()
}

/// Where the broker's node is: its id and its first UDP socket.
fn direct_addr(broker: &Broker) -> NodeAddr {
    let node = broker.node().expect("a p2p listener");
    NodeAddr::new(node.id()).with_direct(node.bound_addrs())
}

async fn dial(client: &Node, to: impl Into<NodeAddr>) -> Connection {
    timeout(WAIT, client.connect(to, MQTT))
        .await
        .expect("connected in time")
        .expect("connected")
}

/// An MQTT client over the first stream of a new connection to `to`.
async fn single_stream(
    client: &Node,
    to: impl Into<NodeAddr>,
    client_id: &str,
) -> (Client, Events, Connection) {
    let conn = dial(client, to).await;
    let (send, recv) = conn.open_bi().await.unwrap();
    let (c, events, _) = connect(tokio::io::join(recv, send), config(client_id), None)
        .await
        .unwrap();
    (c, events, conn)
}

async fn publish_acked(client: &Client, events: &mut Events, t: &str, payload: &str) -> ReasonCode {
    let payload = bytes::Bytes::from(payload.to_owned());
    let message = Message::new(topic(t), payload, QoS::AtLeastOnce, false);
    let _ = client.publish(message).await.unwrap();
    loop {
        match timeout(WAIT, events.recv()).await.expect("an ack in time") {
            Some(Event::Delivered { reason, .. }) => return reason,
            Some(Event::Closed { reason, .. }) => panic!("closed: {reason}"),
            Some(_) => {}
            None => panic!("connection ended"),
        }
    }
}

#[tokio::test]
async fn mqtt_over_a_direct_node_connection_single_and_multi_stream() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.allow_anonymous = Some(true);
    let broker = start(dir.path(), &["p2p://127.0.0.1:0"], config).await;
    let to = direct_addr(&broker);
    let listening = broker.addr(ListenerKind::P2p).unwrap();
    assert!(to.direct.contains(&listening), "{to:?} {listening}");
    // The node's identity is the broker's key file.
    let key = NodeKey::load_or_create(&dir.path().join("data/node.key")).unwrap();
    assert_eq!(key.id(), to.id);

    let client = client_node(NodeKey::generate(), None).await;
    let (sub, mut sub_events, _sub_conn) = single_stream(&client, to.clone(), "sub").await;
    sub.subscribe_one(filter("t/#"), QoS::AtLeastOnce)
        .await
        .unwrap();

    // Multi-stream, as EMQX has it: CONNECT on the control stream, PUBLISH on a data stream,
    // whose PUBACK comes back on it.
    let conn = dial(&client, to.clone()).await;
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut ctl = Raw::new(send, recv);
    ctl.send(&connect_packet("multi", true, 0)).await;
    ctl.connack().await;
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut data = Raw::new(send, recv);
    data.send(&publish_packet(Some(9), "t/multi", b"on a data stream"))
        .await;
    match data.expect("PUBACK").await {
        Packet::PubAck(ack) => {
            assert_eq!(ack.packet_id, id(9));
            assert_eq!(ack.reason, ReasonCode::Success);
        }
        other => panic!("expected PUBACK on the data stream, got {other:?}"),
    }
    assert_eq!(next_payload(&mut sub_events).await, "on a data stream");
    ctl.ping().await;

    assert_eq!(
        metric(&broker, "mqttd_p2p_connections_total{path=\"direct\"}"),
        2
    );
    assert_eq!(metric(&broker, "mqttd_p2p_connections_open"), 2);
    assert_eq!(metric(&broker, "mqttd_quic_connections"), 0);
    // Traversal: two attempts, both direct from the start; the broker's node has no relay,
    // so its NAT type is unknown.
    let nat = "nat=\"unknown\"";
    assert_eq!(
        metric(
            &broker,
            &format!("mqttd_p2p_traversal_attempts_total{{{nat}}}")
        ),
        2
    );
    let direct = format!("mqttd_p2p_traversals_total{{{nat},outcome=\"direct\"}}");
    assert_eq!(metric_reaches(&broker, &direct, 2).await, 2);
    assert_eq!(
        metric_reaches(&broker, "mqttd_p2p_direct_path_seconds_count", 2).await,
        2
    );
    assert_eq!(metric(&broker, "mqttd_p2p_first_byte_seconds_count"), 2);
    metric_reaches(
        &broker,
        "mqttd_p2p_path_bytes_total{path=\"direct\",direction=\"received\"}",
        1,
    )
    .await;
    for outcome in ["relay_only", "failed", "refused"] {
        let name = format!("mqttd_p2p_traversals_total{{{nat},outcome=\"{outcome}\"}}");
        assert_eq!(metric(&broker, &name), 0, "{name}");
    }
    assert_eq!(
        metric(
            &broker,
            "mqttd_p2p_path_bytes_total{path=\"relay\",direction=\"sent\"}"
        ),
        0
    );
    conn.close(0, b"done");

    // At shutdown, the node's connections get their DISCONNECT before the node closes.
    broker.shutdown().await;
    loop {
        match timeout(WAIT, sub_events.recv())
            .await
            .expect("closed in time")
        {
            Some(Event::Closed { reason, .. }) => {
                assert_eq!(reason, ReasonCode::ServerShuttingDown);
                break;
            }
            Some(_) => {}
            None => panic!("no Closed event"),
        }
    }
    client.close().await;
}

#[tokio::test]
async fn mqtt_through_the_brokers_own_relay_given_only_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.allow_anonymous = Some(true);
    config.relay.allow_any = true;
    let broker = start(
        dir.path(),
        &["relay://127.0.0.1:0", "p2p://127.0.0.1:0"],
        config,
    )
    .await;
    let relay = broker.addr(ListenerKind::Relay).unwrap();
    let url: RelayUrl = format!("https://{relay}").parse().unwrap();
    let ca = dir.path().join("data/tls/ca.pem");
    let id = broker.node().unwrap().id();
    // The start waits until the broker's node is at home on its relay, so that a peer dialing
    // through the relay at once is not dropped by a relay that does not know the node yet.
    let states = broker.node().unwrap().relay_states();
    assert!(states.iter().any(|s| s.connected), "{states:?}");

    let a = client_node(NodeKey::generate(), Some((&url, &ca))).await;
    let b = client_node(NodeKey::generate(), Some((&url, &ca))).await;
    let (sub, mut sub_events, sub_conn) = single_stream(&a, id, "sub").await;
    sub.subscribe_one(filter("r"), QoS::AtMostOnce)
        .await
        .unwrap();
    let (publisher, mut pub_events, _pub_conn) = single_stream(&b, id, "pub").await;
    assert_eq!(
        publish_acked(&publisher, &mut pub_events, "r", "relayed").await,
        ReasonCode::Success
    );
    assert_eq!(next_payload(&mut sub_events).await, "relayed");
    assert!(sub_conn
        .selected_path()
        .is_some_and(|p| p.kind.is_relayed()));
    assert_eq!(
        metric(&broker, "mqttd_p2p_connections_total{path=\"relayed\"}"),
        2
    );
    // The clients withhold direct paths: once their connections close, both attempts were
    // relay only, and the relay carried their bytes.
    for n in [a, b] {
        n.close().await;
    }
    let nat = "nat=\"unknown\"";
    let relay_only = format!("mqttd_p2p_traversals_total{{{nat},outcome=\"relay_only\"}}");
    assert_eq!(metric_reaches(&broker, &relay_only, 2).await, 2);
    let direct = format!("mqttd_p2p_traversals_total{{{nat},outcome=\"direct\"}}");
    assert_eq!(metric(&broker, &direct), 0);
    assert_eq!(metric(&broker, "mqttd_p2p_direct_path_seconds_count"), 0);
    metric_reaches(
        &broker,
        "mqttd_p2p_path_bytes_total{path=\"relay\",direction=\"received\"}",
        1,
    )
    .await;
    // Its own relay is the broker's node's home relay.
    metric_reaches(
        &broker,
        &format!("mqttd_p2p_relay_up{{relay=\"{url}\"}}"),
        1,
    )
    .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn the_node_id_is_the_user_name_the_acl_applies_to() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "pattern readwrite nodes/%u/#\n").unwrap();
    let mut config = Config::default();
    config.acl_file = Some(acl);
    config.allow_anonymous = Some(false);
    config.p2p.use_node_id_as_username = true;
    let broker = start(dir.path(), &["p2p://127.0.0.1:0"], config).await;
    let to = direct_addr(&broker);

    let key = NodeKey::generate();
    let own = format!("nodes/{}/status", key.id());
    let other = format!("nodes/{}/status", NodeKey::generate().id());
    let client = client_node(key, None).await;
    // No user name or password in CONNECT: the node's key is the credential.
    let (c, mut events, _conn) = single_stream(&client, to.clone(), "device").await;
    let ack = c
        .subscribe_one(filter(&format!("{own}/#")), QoS::AtMostOnce)
        .await
        .unwrap();
    assert!(!ack.reasons[0].is_error(), "{ack:?}");
    assert_eq!(
        publish_acked(&c, &mut events, &own, "mine").await,
        ReasonCode::Success
    );
    assert_eq!(next_payload(&mut events).await, "mine");
    assert_eq!(
        publish_acked(&c, &mut events, &other, "theirs").await,
        ReasonCode::NotAuthorized
    );
    let ack = c
        .subscribe_one(filter(&other), QoS::AtMostOnce)
        .await
        .unwrap();
    assert_eq!(ack.reasons[0], ReasonCode::NotAuthorized);

    // Reloaded off: the next CONNECT without credentials is anonymous, refused here; the
    // connection that is up keeps its user name.
    let mut p2p = mqttd_broker::P2pConfig::default();
    p2p.use_node_id_as_username = false;
    broker.reload_p2p(&p2p).unwrap();
    let conn = dial(&client, to.clone()).await;
    let (send, recv) = conn.open_bi().await.unwrap();
    match connect(
        tokio::io::join(recv, send),
        common::quic::config("device-2"),
        None,
    )
    .await
    {
        Err(mqttd_client::ConnectError::Refused(ack)) => assert!(ack.reason.is_error()),
        Err(other) => panic!("expected a refusing CONNACK, got {other}"),
        Ok(_) => panic!("an anonymous client was let in"),
    }
    assert_eq!(
        publish_acked(&c, &mut events, &own, "mine still").await,
        ReasonCode::Success
    );
    client.close().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn a_node_not_in_the_allow_list_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = NodeKey::generate();
    let mut config = Config::default();
    config.allow_anonymous = Some(true);
    config.p2p.allow = vec![allowed.id().to_string()];
    let broker = start(dir.path(), &["p2p://127.0.0.1:0"], config).await;
    let to = direct_addr(&broker);

    let stranger = client_node(NodeKey::generate(), None).await;
    let conn = dial(&stranger, to.clone()).await;
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut ctl = Raw::new(send, recv);
    ctl.send(&connect_packet("stranger", true, 0)).await;
    match timeout(WAIT, conn.closed()).await.expect("closed in time") {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(u64::from(close.error_code), 0x87);
            assert_eq!(&close.reason[..], b"node not allowed");
        }
        other => panic!("expected the broker's close, got {other:?}"),
    }
    assert!(ctl.recv().await.is_none(), "no CONNACK for a stranger");
    assert_eq!(metric(&broker, "mqttd_p2p_refused_total"), 1);
    assert_eq!(
        metric(
            &broker,
            "mqttd_p2p_traversals_total{nat=\"unknown\",outcome=\"refused\"}"
        ),
        1
    );
    // Refused by the node's endpoint: the listener never took the connection, so no MQTT
    // byte of the CONNECT was read.
    for path in ["direct", "relayed"] {
        let key = format!("mqttd_p2p_connections_total{{path=\"{path}\"}}");
        assert_eq!(metric(&broker, &key), 0, "{key}");
    }

    let friend = client_node(allowed.clone(), None).await;
    let (c, mut events, _conn) = single_stream(&friend, to.clone(), "friend").await;
    let reason = publish_acked(&c, &mut events, "t", "hello").await;
    assert!(!reason.is_error(), "{reason}");
    assert_eq!(metric(&broker, "mqttd_p2p_refused_total"), 1);

    // A reload lets the stranger in; the friend's connection stays up through it.
    let mut p2p = mqttd_broker::P2pConfig::default();
    p2p.allow = vec![allowed.id().to_string(), stranger.id().to_string()];
    broker.reload_p2p(&p2p).unwrap();
    let (s, mut s_events, _s_conn) = single_stream(&stranger, to.clone(), "stranger").await;
    let reason = publish_acked(&s, &mut s_events, "t", "let in").await;
    assert!(!reason.is_error(), "{reason}");
    let reason = publish_acked(&c, &mut events, "t", "still here").await;
    assert!(!reason.is_error(), "{reason}");
    // A node id that does not parse changes nothing.
    p2p.allow = vec!["not-a-node".into()];
    assert!(broker.reload_p2p(&p2p).is_err());
    // And a reload that drops the friend refuses its next connection, not the one it has.
    p2p.allow = vec![stranger.id().to_string()];
    broker.reload_p2p(&p2p).unwrap();
    let again = dial(&friend, to).await;
    match timeout(WAIT, again.closed()).await.expect("closed in time") {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(u64::from(close.error_code), 0x87)
        }
        other => panic!("expected the broker's close, got {other:?}"),
    }
    let reason = publish_acked(&c, &mut events, "t", "up still").await;
    assert!(!reason.is_error(), "{reason}");
    assert_eq!(metric(&broker, "mqttd_p2p_refused_total"), 2);
    for n in [stranger, friend] {
        n.close().await;
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn a_second_p2p_listener_or_a_bad_relay_url_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.listen = vec!["p2p://".into(), "p2p://127.0.0.1:0".into()];
    config.data_dir = dir.path().join("data");
    assert!(Broker::builder(config).start().await.is_err());
    let mut config = Config::default();
    config.listen = vec!["p2p://127.0.0.1:0".into()];
    config.data_dir = dir.path().join("data");
    config.p2p.relays = vec!["http://relay.example".into()];
    let error = Broker::builder(config)
        .start()
        .await
        .err()
        .expect("refused");
    assert!(error.to_string().contains("p2p.relays"), "{error}");
}
