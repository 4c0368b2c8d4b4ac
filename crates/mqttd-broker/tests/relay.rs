//! The `relay://` listener (feature `p2p`): mqttd-p2p nodes trusting the CA the broker
//! generated go online through it and talk through it; a node not in `relay.allow` is refused;
//! a malformed allow-list stops the broker from starting.

use std::time::Duration;

use mqttd_broker::{Broker, Config, ListenerKind, StartError};
use mqttd_p2p::{Node, NodeConfig, NodeKey, PathKind, RelayUrl};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(60);
const ALPN: &[u8] = b"mqttd/relay-test";

async fn node(key: NodeKey, url: &RelayUrl, ca: &std::path::Path) -> Node {
    let mut config = NodeConfig::new(key);
    config.relays = vec![url.clone()];
    config.relay_roots = vec![CertificateDer::from_pem_file(ca).unwrap()];
    config.webpki_roots = false;
    config.direct_paths = false;
    config.alpns = vec![ALPN.to_vec()];
    Node::bind(config).await.unwrap()
}

#[tokio::test]
async fn allowed_nodes_talk_through_the_brokers_relay_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (NodeKey::generate(), NodeKey::generate());
    let mut config = Config::default();
    config.listen = vec!["relay://127.0.0.1:0".into()];
    config.data_dir = dir.path().join("data");
    config.relay.allow = vec![a.id().to_string(), b.id().to_string()];
    let broker = Broker::builder(config).start().await.unwrap();
    let addr = broker.addr(ListenerKind::Relay).unwrap();
    let url: RelayUrl = format!("https://{addr}").parse().unwrap();
    let ca = dir.path().join("data/tls/ca.pem");

    let a = node(a, &url, &ca).await;
    let b = node(b, &url, &ca).await;
    for n in [&a, &b] {
        timeout(WAIT, n.wait_relays(|s| s.iter().any(|s| s.connected)))
            .await
            .unwrap_or_else(|_| panic!("not online: {:?}", n.relay_states()));
    }
    let server = tokio::spawn({
        let a = a.clone();
        async move {
            let conn = a.accept().await.unwrap().accept().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let data = recv.read_to_end(1024).await.unwrap();
            send.write_all(&data).await.unwrap();
            send.finish().unwrap();
            conn.closed().await;
        }
    });
    let conn = timeout(WAIT, b.connect(a.id(), ALPN))
        .await
        .unwrap()
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"via the broker").await.unwrap();
    send.finish().unwrap();
    let back = timeout(WAIT, recv.read_to_end(1024))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"via the broker");
    assert_eq!(
        conn.selected_path().map(|p| p.kind),
        Some(PathKind::Relayed(url.clone()))
    );
    conn.close(0, b"done");
    server.await.unwrap();

    let stranger = node(NodeKey::generate(), &url, &ca).await;
    let states = timeout(
        WAIT,
        stranger.wait_relays(|s| s.iter().any(|s| s.denied.is_some())),
    )
    .await
    .unwrap_or_else(|_| panic!("not refused: {:?}", stranger.relay_states()))
    .unwrap();
    assert!(states.iter().all(|s| !s.connected));

    for n in [a, b, stranger] {
        n.close().await;
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn a_malformed_allow_list_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.listen = vec!["relay://127.0.0.1:0".into()];
    config.data_dir = dir.path().join("data");
    config.relay.allow = vec!["not-a-node-id".into()];
    match Broker::builder(config).start().await {
        Err(StartError::Bind { url, source }) => {
            assert_eq!(url, "relay://127.0.0.1:0");
            assert!(source.to_string().contains("relay.allow"), "{source}");
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("started with a malformed allow-list"),
    }
}
