//! Two nodes on loopback, given each other's addresses, connect directly and exchange data;
//! the identity file is created private and reloaded; pings are answered, or time out.

use std::time::Duration;

use mqttd_p2p::{ConnectError, KeyError, Node, NodeAddr, NodeConfig, NodeKey, PathEvent, KEY_FILE};

const ALPN: &[u8] = b"mqttd-p2p/test";
const LIMIT: Duration = Duration::from_secs(30);

async fn node(alpns: &[&[u8]]) -> Node {
    let mut config = NodeConfig::new(NodeKey::generate());
    config.bind = vec!["127.0.0.1:0".parse().unwrap()];
    config.alpns = alpns.iter().map(|a| a.to_vec()).collect();
    Node::bind(config).await.unwrap()
}

#[tokio::test]
async fn two_nodes_connect_directly_and_exchange_data_on_a_stream() {
    let server = node(&[ALPN]).await;
    let client = node(&[]).await;
    let addrs = server.bound_addrs();
    assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() != 0));

    let accept = tokio::spawn({
        let server = server.clone();
        async move {
            let conn = server.accept().await.unwrap().accept().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let request = recv.read_to_end(1 << 20).await.unwrap();
            send.write_all(&request).await.unwrap();
            send.write_all(b" back").await.unwrap();
            send.finish().unwrap();
            // Wait for the client to close, so the reply is not cut off.
            conn.closed().await;
            conn.remote_id()
        }
    });

    let to = NodeAddr::new(server.id()).with_direct(addrs);
    let conn = tokio::time::timeout(LIMIT, client.connect(to, ALPN))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(conn.remote_id(), server.id());
    assert_eq!(conn.alpn(), ALPN);
    let path = conn.selected_path().expect("a selected path");
    assert!(path.kind.is_direct(), "{path:?}");
    let mut events = conn.path_events();
    match events.next().await {
        Some(PathEvent::Opened(info)) => assert!(info.kind.is_direct()),
        other => panic!("expected the direct path first, got {other:?}"),
    }

    let payload = vec![7u8; 100_000];
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&payload).await.unwrap();
    send.finish().unwrap();
    let reply = tokio::time::timeout(LIMIT, recv.read_to_end(1 << 20))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.len(), payload.len() + 5);
    assert!(reply.ends_with(b" back"));
    conn.close(0, b"done");
    assert_eq!(accept.await.unwrap(), client.id());
    client.close().await;
    server.close().await;
}

#[tokio::test]
async fn a_peer_without_an_address_and_no_relay_cannot_be_dialed() {
    let client = node(&[]).await;
    let peer = NodeKey::generate().id();
    assert!(matches!(
        client.connect(peer, ALPN).await,
        Err(ConnectError::NoAddress(id)) if id == peer
    ));
    assert!(matches!(
        client.connect(client.id(), ALPN).await,
        Err(ConnectError::SelfConnect | ConnectError::NoAddress(_))
    ));
    client.close().await;
}

#[tokio::test]
async fn an_unknown_alpn_is_refused() {
    let server = node(&[ALPN]).await;
    let client = node(&[]).await;
    let accept = tokio::spawn({
        let server = server.clone();
        async move {
            // The attempt fails in the handshake; keep accepting until the node closes.
            while let Some(incoming) = server.accept().await {
                let _ = incoming.accept().await;
            }
        }
    });
    let to = NodeAddr::new(server.id()).with_direct(server.bound_addrs());
    let result = tokio::time::timeout(LIMIT, client.connect(to, b"other"))
        .await
        .unwrap();
    assert!(
        matches!(result, Err(ConnectError::Handshake { .. })),
        "{result:?}"
    );
    client.close().await;
    server.close().await;
    accept.await.unwrap();
}

#[cfg(unix)]
#[test]
fn the_key_file_is_created_private_and_reloaded_with_the_same_id() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data").join(KEY_FILE);
    let created = NodeKey::load_or_create(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.trim().len(), 64);
    assert_eq!(NodeKey::load_or_create(&path).unwrap().id(), created.id());
    // Nothing is left behind from the atomic write.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [KEY_FILE]);

    // Open to the group: fixed to 0600, same identity.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(NodeKey::load_or_create(&path).unwrap().id(), created.id());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Open to everyone: refused, and left as it is for the operator.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        NodeKey::load_or_create(&path),
        Err(KeyError::Exposed { mode: 0o644, .. })
    ));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);

    // Not a key: refused, not replaced.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&path, "not a key\n").unwrap();
    assert!(matches!(
        NodeKey::load_or_create(&path),
        Err(KeyError::Invalid { .. })
    ));
}

#[tokio::test]
async fn a_node_bound_with_a_loaded_key_has_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let key = NodeKey::load_or_create(&dir.path().join(KEY_FILE)).unwrap();
    let id = key.id();
    let mut config = NodeConfig::new(key);
    config.bind = vec!["127.0.0.1:0".parse().unwrap()];
    let node = Node::bind(config).await.unwrap();
    assert_eq!(node.id(), id);
    node.close().await;
}

#[tokio::test]
async fn pings_are_answered_with_their_path_and_an_unanswered_one_times_out() {
    use mqttd_p2p::{serve_pings, Pinger, PING_ALPN};

    let server = node(&[PING_ALPN]).await;
    let client = node(&[]).await;
    let serving = tokio::spawn({
        let server = server.clone();
        async move {
            let conn = server.accept().await.unwrap().accept().await.unwrap();
            serve_pings(&conn).await
        }
    });
    let to = NodeAddr::new(server.id()).with_direct(server.bound_addrs());
    let conn = tokio::time::timeout(LIMIT, client.connect(to.clone(), PING_ALPN))
        .await
        .unwrap()
        .unwrap();
    let mut pinger = Pinger::open(conn).await.unwrap();
    for seq in 1..=3 {
        let pong = pinger.ping(LIMIT).await.unwrap().expect("an answer");
        assert_eq!(pong.seq, seq);
        assert!(
            pong.path.as_ref().is_some_and(|p| p.is_direct()),
            "{pong:?}"
        );
    }
    pinger.close();
    assert_eq!(serving.await.unwrap(), 3);

    // A node that reads pings and never answers.
    let silent = tokio::spawn({
        let server = server.clone();
        async move {
            let conn = server.accept().await.unwrap().accept().await.unwrap();
            let (_send, mut recv) = conn.accept_bi().await.unwrap();
            let _ = recv.read_to_end(1024).await;
            conn.closed().await;
        }
    });
    let conn = client.connect(to, PING_ALPN).await.unwrap();
    let mut pinger = Pinger::open(conn).await.unwrap();
    assert_eq!(pinger.ping(Duration::from_millis(200)).await.unwrap(), None);
    pinger.close();
    silent.await.unwrap();
    client.close().await;
    server.close().await;
}
