//! Nodes and an in-process relay on loopback: connections through the relay only, a
//! connection that starts relayed and goes direct, and the relay's allow-list; with two
//! relays, the NAT type (none on loopback) and the relays' states, a peer reached through the
//! one it is at home on whichever the dialer names, and a node that moves home when its relay
//! goes away; connect retries.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::time::Duration;

use mqttd_p2p::{
    ClientRate, Connection, NatType, Node, NodeAddr, NodeConfig, NodeId, NodeKey, PathEvent,
    PathKind, RelayAccess, RelayServer, RelayServerConfig, RelayUrl, Retry,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const ALPN: &[u8] = b"mqttd-p2p/test";
const LIMIT: Duration = Duration::from_secs(60);

/// A CA and a server certificate it signed for 127.0.0.1 (and 127.0.0.2, a second relay's
/// address), as a broker generates them.
struct Certs {
    ca: CertificateDer<'static>,
    server: rustls::ServerConfig,
}

fn certs() -> Certs {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(params, ca_key);
    let key = KeyPair::generate().unwrap();
    let names = ["127.0.0.1", "127.0.0.2", "localhost"].map(str::to_owned);
    let leaf = CertificateParams::new(names.to_vec())
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    Certs {
        ca: ca.der().clone(),
        server,
    }
}

async fn relay(certs: &Certs, allowed: &[NodeId]) -> RelayServer {
    relay_at("127.0.0.1:0", certs, allowed).await
}

async fn relay_at(addr: &str, certs: &Certs, allowed: &[NodeId]) -> RelayServer {
    let mut config = RelayServerConfig::new(addr.parse().unwrap(), certs.server.clone());
    config.access = RelayAccess::Allow(allowed.iter().copied().collect::<HashSet<_>>());
    RelayServer::spawn(config).await.unwrap()
}

fn config(key: NodeKey, relay: &RelayUrl, certs: &Certs, direct: bool) -> NodeConfig {
    let mut config = NodeConfig::new(key);
    config.bind = vec!["127.0.0.1:0".parse().unwrap()];
    config.relays = vec![relay.clone()];
    config.relay_roots = vec![certs.ca.clone()];
    config.webpki_roots = false;
    config.direct_paths = direct;
    config.alpns = vec![ALPN.to_vec()];
    config
}

async fn online(node: &Node) {
    let states = tokio::time::timeout(LIMIT, node.wait_relays(|s| s.iter().any(|s| s.connected)))
        .await
        .unwrap_or_else(|_| panic!("not online: {:?}", node.relay_states()))
        .unwrap();
    assert!(states.iter().all(|s| s.denied.is_none()), "{states:?}");
}

/// Accepts one connection and echoes one stream on it.
fn echo(node: &Node) -> tokio::task::JoinHandle<Connection> {
    let node = node.clone();
    tokio::spawn(async move {
        let conn = node.accept().await.unwrap().accept().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let data = recv.read_to_end(1 << 20).await.unwrap();
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        conn
    })
}

async fn round_trip(conn: &Connection, data: &[u8]) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(data).await.unwrap();
    send.finish().unwrap();
    let back = tokio::time::timeout(LIMIT, recv.read_to_end(1 << 20))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, data);
}

#[tokio::test]
async fn two_nodes_without_direct_paths_talk_through_the_relay() {
    let certs = certs();
    let (a, b) = (NodeKey::generate(), NodeKey::generate());
    let server = relay(&certs, &[a.id(), b.id()]).await;
    let url = server.url();
    assert_eq!(url.quic_port(), server.local_addr().port());
    assert_eq!(server.quic_addr(), Some(server.local_addr()));
    let a = Node::bind(config(a, &url, &certs, false)).await.unwrap();
    let b = Node::bind(config(b, &url, &certs, false)).await.unwrap();
    assert!(a.bound_addrs().is_empty(), "{:?}", a.bound_addrs());
    online(&a).await;
    online(&b).await;
    assert_eq!(server.stats().clients, 2);

    let accepted = echo(&a);
    // Only the id: the dialer tries its own relays.
    let conn = tokio::time::timeout(LIMIT, b.connect(a.id(), ALPN))
        .await
        .unwrap()
        .unwrap();
    let mut events = conn.path_events();
    match events.next().await {
        Some(PathEvent::Opened(path)) => {
            assert_eq!(path.kind, PathKind::Relayed(url.clone()));
        }
        other => panic!("expected the relayed path, got {other:?}"),
    }
    round_trip(&conn, &[3u8; 50_000]).await;
    let path = conn.selected_path().expect("a selected path");
    assert_eq!(path.kind, PathKind::Relayed(url.clone()));
    assert!(conn.paths().iter().all(|p| p.kind.is_relayed()));
    let accepted = accepted.await.unwrap();
    assert_eq!(accepted.remote_id(), b.id());

    conn.close(0, b"done");
    b.close().await;
    a.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_connection_made_through_the_relay_goes_direct() {
    let certs = certs();
    let (a, b) = (NodeKey::generate(), NodeKey::generate());
    let server = relay(&certs, &[a.id(), b.id()]).await;
    let url = server.url();
    let a = Node::bind(config(a, &url, &certs, true)).await.unwrap();
    let b = Node::bind(config(b, &url, &certs, true)).await.unwrap();
    online(&a).await;
    online(&b).await;

    let accepted = echo(&a);
    // The relay and no direct address: the first path is relayed, then iroh learns a's
    // addresses through the relay and punches a direct path (trivially, on loopback).
    let to = NodeAddr::new(a.id()).with_relay(url.clone());
    let conn = tokio::time::timeout(LIMIT, b.connect(to, ALPN))
        .await
        .unwrap()
        .unwrap();
    let mut events = conn.path_events();
    round_trip(&conn, b"through whatever path").await;
    let mut seen = Vec::new();
    let direct = tokio::time::timeout(LIMIT, async {
        while let Some(event) = events.next().await {
            seen.push(event.clone());
            if let PathEvent::Selected(path) = event {
                if path.kind.is_direct() {
                    return path;
                }
            }
        }
        panic!("connection closed before a direct path: {seen:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no direct path: {:?}", conn.paths()));
    let relayed = PathKind::Relayed(url.clone());
    let saw_relayed = seen
        .iter()
        .any(|e| matches!(e, PathEvent::Opened(p) | PathEvent::Selected(p) if p.kind == relayed));
    assert!(
        saw_relayed,
        "no relayed path event before the direct one: {seen:?}"
    );
    assert!(direct.rtt < Duration::from_secs(5), "{direct:?}");
    let _ = accepted.await.unwrap();
    conn.close(0, b"done");
    b.close().await;
    a.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_node_not_on_the_allow_list_is_refused() {
    let certs = certs();
    let allowed = NodeKey::generate();
    let server = relay(&certs, &[allowed.id()]).await;
    let url = server.url();
    let stranger = Node::bind(config(NodeKey::generate(), &url, &certs, false))
        .await
        .unwrap();
    let states = tokio::time::timeout(
        LIMIT,
        stranger.wait_relays(|s| s.iter().any(|s| s.denied.is_some())),
    )
    .await
    .unwrap_or_else(|_| panic!("not refused: {:?}", stranger.relay_states()))
    .unwrap();
    assert!(states.iter().all(|s| !s.connected), "{states:?}");
    assert!(server.stats().refused_not_allowed >= 1);
    assert_eq!(server.stats().clients, 0);

    // The node on the list gets in.
    let allowed = Node::bind(config(allowed, &url, &certs, false))
        .await
        .unwrap();
    online(&allowed).await;
    // And any node once the relay admits any (the stranger, which keeps retrying, is gone
    // first, so that the count below is exact).
    stranger.close().await;
    drop(stranger);
    server.set_access(RelayAccess::Any);
    let anyone = Node::bind(config(NodeKey::generate(), &url, &certs, false))
        .await
        .unwrap();
    online(&anyone).await;
    assert_eq!(server.stats().clients, 2);
    for node in [anyone, allowed] {
        node.close().await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn address_discovery_validates_addresses_with_a_retry_first() {
    let certs = certs();
    let key = NodeKey::generate();
    let server = relay(&certs, &[key.id()]).await;
    // With direct paths, the node asks the relay for its address over QUIC.
    let node = Node::bind(config(key, &server.url(), &certs, true))
        .await
        .unwrap();
    online(&node).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while server.stats().discovery_connections == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no address discovery: {:?}",
            server.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each connection came from an address that had echoed a Retry's token.
    let stats = server.stats();
    assert!(
        stats.discovery_retries >= stats.discovery_connections,
        "{stats:?}"
    );
    node.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_over_its_rate_is_throttled_and_the_others_are_not() {
    const RATE: u32 = 64 * 1024;
    const BURST: u32 = 64 * 1024;
    const WINDOW: Duration = Duration::from_secs(3);
    const MESSAGES: usize = 30;
    let certs = certs();
    let keys: Vec<NodeKey> = (0..4).map(|_| NodeKey::generate()).collect();
    let mut relay_config =
        RelayServerConfig::new("127.0.0.1:0".parse().unwrap(), certs.server.clone());
    relay_config.access = RelayAccess::Allow(keys.iter().map(NodeKey::id).collect());
    let mut rate = ClientRate::new(NonZeroU32::new(RATE).unwrap());
    rate.burst_bytes = NonZeroU32::new(BURST);
    relay_config.client_rate = Some(rate);
    let server = RelayServer::spawn(relay_config).await.unwrap();
    let url = server.url();
    let mut nodes = Vec::new();
    for key in keys {
        let node = Node::bind(config(key, &url, &certs, false)).await.unwrap();
        online(&node).await;
        nodes.push(node);
    }
    let (greedy, sink, polite, listener) = (&nodes[0], &nodes[1], &nodes[2], &nodes[3]);

    // The sink counts what arrives in the window from the stream's first byte.
    let sink_task = {
        let sink = sink.clone();
        tokio::spawn(async move {
            let conn = sink.accept().await.unwrap().accept().await.unwrap();
            let (_send, mut recv) = conn.accept_bi().await.unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = match recv.read(&mut buf).await.unwrap() {
                Some(n) => n as u64,
                None => 0,
            };
            let start = tokio::time::Instant::now();
            let until = start + WINDOW;
            while let Ok(Ok(Some(n))) = tokio::time::timeout_at(until, recv.read(&mut buf)).await {
                total += n as u64;
            }
            (total, start.elapsed(), conn)
        })
    };
    let conn = tokio::time::timeout(LIMIT, greedy.connect(sink.id(), ALPN))
        .await
        .unwrap()
        .unwrap();
    // Writes as fast as the relay lets it, until the sink stops counting.
    let flood = tokio::spawn(async move {
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let chunk = vec![7u8; 16 * 1024];
        while send.write_all(&chunk).await.is_ok() {}
        conn
    });

    // Meanwhile another client's messages all arrive, each answered.
    let echo_task = {
        let listener = listener.clone();
        tokio::spawn(async move {
            let conn = listener.accept().await.unwrap().accept().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let mut message = [0u8; 100];
            let mut echoed = 0;
            while recv.read_exact(&mut message).await.is_ok() {
                send.write_all(&message).await.unwrap();
                echoed += 1;
            }
            (echoed, conn)
        })
    };
    let conn = tokio::time::timeout(LIMIT, polite.connect(listener.id(), ALPN))
        .await
        .unwrap()
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    for n in 0..MESSAGES {
        let message = [n as u8; 100];
        send.write_all(&message).await.unwrap();
        let mut back = [0u8; 100];
        tokio::time::timeout(LIMIT, recv.read_exact(&mut back))
            .await
            .unwrap_or_else(|_| panic!("message {n} not answered while the other client floods"))
            .unwrap();
        assert_eq!(back, message);
    }
    send.finish().unwrap();
    let (echoed, _listener_conn) = echo_task.await.unwrap();
    assert_eq!(echoed, MESSAGES);

    let (received, took, _sink_conn) = sink_task.await.unwrap();
    // What went through the relay is bounded by rate x time + burst (QUIC's own bytes count
    // against the limit too, so the application's are fewer); a margin for the first read.
    let bound = (f64::from(RATE) * took.as_secs_f64() + f64::from(BURST)) * 1.1 + 64.0 * 1024.0;
    assert!(
        (received as f64) <= bound,
        "{received} bytes through the relay in {took:?}, above {bound:.0}"
    );
    println!("relay rate limit: {received} bytes in {took:?} (bound {bound:.0})");
    // And the flood did get through at some rate: it is throttled, not cut off.
    assert!(
        received > u64::from(RATE) / 2,
        "{received} bytes in {took:?}"
    );
    flood.abort();
    conn.close(0, b"done");
    for node in nodes {
        node.close().await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn two_relays_tell_the_nat_type_and_each_relay_has_a_state() {
    let certs = certs();
    let (key, lone) = (NodeKey::generate(), NodeKey::generate());
    let allowed = [key.id(), lone.id()];
    let first = relay_at("127.0.0.1:0", &certs, &allowed).await;
    let second = relay_at("127.0.0.2:0", &certs, &allowed).await;
    let mut two = config(key, &first.url(), &certs, true);
    two.relays.push(second.url());
    let node = Node::bind(two).await.unwrap();
    // Both relays see the node at its own address: no NAT.
    let nat = tokio::time::timeout(LIMIT, node.nat_type_known())
        .await
        .unwrap_or_else(|_| panic!("no NAT type: {:?}", node.relay_states()));
    assert_eq!(nat, NatType::None);
    assert_eq!(node.nat_type(), NatType::None);
    online(&node).await;
    let states = node.relay_states();
    assert_eq!(states.len(), 2, "{states:?}");
    assert_eq!(
        states.iter().filter(|s| s.home && s.connected).count(),
        1,
        "{states:?}"
    );
    assert!(states.iter().all(|s| s.latency.is_some()), "{states:?}");

    // With one relay, nothing can be told.
    let lone = Node::bind(config(lone, &first.url(), &certs, true))
        .await
        .unwrap();
    online(&lone).await;
    assert_eq!(lone.nat_type(), NatType::Unknown);
    for n in [node, lone] {
        n.close().await;
    }
}

#[tokio::test]
async fn a_refused_attempt_is_tried_again() {
    // Direct paths only, on loopback: no relay needed.
    let bind = || {
        let mut config = NodeConfig::new(NodeKey::generate());
        config.bind = vec!["127.0.0.1:0".parse().unwrap()];
        config.alpns = vec![ALPN.to_vec()];
        Node::bind(config)
    };
    let (a, b) = (bind().await.unwrap(), bind().await.unwrap());
    // b refuses the first two attempts, then accepts.
    let acceptor = {
        let b = b.clone();
        tokio::spawn(async move {
            for _ in 0..2 {
                b.accept().await.unwrap().refuse();
            }
            b.accept().await.unwrap().accept().await.unwrap()
        })
    };
    let to = NodeAddr::new(b.id()).with_direct(b.bound_addrs());
    let mut once = Retry::new(LIMIT);
    once.attempts = 1;
    assert!(a.connect_with_retry(to.clone(), ALPN, &once).await.is_err());
    let conn = a
        .connect_with_retry(to, ALPN, &Retry::new(LIMIT))
        .await
        .expect("connected on the second attempt");
    let accepted = tokio::time::timeout(LIMIT, acceptor)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(accepted.remote_id(), a.id());
    drop(conn);
    for n in [a, b] {
        n.close().await;
    }
}

/// A node that names both relays, without direct paths.
fn config_two(key: NodeKey, relays: [&RelayUrl; 2], certs: &Certs) -> NodeConfig {
    let mut config = config(key, relays[0], certs, false);
    config.relays = relays.iter().map(|r| (*r).clone()).collect();
    config
}

/// The relay `node` is at home on, once it is connected to one.
async fn home(node: &Node) -> RelayUrl {
    let states = tokio::time::timeout(LIMIT, node.wait_relays(|s| s.iter().any(|s| s.connected)))
        .await
        .unwrap_or_else(|_| panic!("not online: {:?}", node.relay_states()))
        .unwrap();
    states.into_iter().find(|s| s.connected).unwrap().url
}

#[tokio::test]
async fn with_two_relays_a_lost_home_relay_is_replaced_at_once() {
    let certs = certs();
    let (a, b, c) = (
        NodeKey::generate(),
        NodeKey::generate(),
        NodeKey::generate(),
    );
    let allowed = [a.id(), b.id(), c.id()];
    let mut servers = vec![relay(&certs, &allowed).await, relay(&certs, &allowed).await];
    let urls = [servers[0].url(), servers[1].url()];
    let a = Node::bind(config_two(a, [&urls[0], &urls[1]], &certs))
        .await
        .unwrap();
    let first_home = home(&a).await;

    // A peer dials through every relay it knows, so it reaches `a` whichever is its home, even
    // when it names the other one first (and `a` only as an id).
    let other_first = if first_home == urls[0] {
        [&urls[1], &urls[0]]
    } else {
        [&urls[0], &urls[1]]
    };
    let b = Node::bind(config_two(b, other_first, &certs))
        .await
        .unwrap();
    let accepted = echo(&a);
    let conn = tokio::time::timeout(
        LIMIT,
        b.connect(
            NodeAddr::new(a.id()).with_relay(other_first[0].clone()),
            ALPN,
        ),
    )
    .await
    .expect("connected in time")
    .expect("connected through the home relay");
    round_trip(&conn, b"through the home relay").await;
    accepted.await.unwrap();
    b.close().await;

    // The home relay goes away: `a` measures the relays again at once and moves home to the
    // other, well before iroh's next periodic measurement (20 to 26 s after the last one).
    let gone = servers.remove(usize::from(first_home != urls[0]));
    gone.shutdown().await;
    let other = if first_home == urls[0] {
        &urls[1]
    } else {
        &urls[0]
    };
    let moved = tokio::time::timeout(
        Duration::from_secs(15),
        a.wait_relays(|s| s.iter().any(|s| s.connected && &s.url == other)),
    )
    .await;
    assert!(moved.is_ok(), "still {:?}", a.relay_states());

    // And a new peer reaches it through the relay that is left.
    let c = Node::bind(config_two(c, [&urls[0], &urls[1]], &certs))
        .await
        .unwrap();
    let accepted = echo(&a);
    let conn = tokio::time::timeout(LIMIT, c.connect(a.id(), ALPN))
        .await
        .expect("connected in time")
        .expect("connected through the other relay");
    round_trip(&conn, b"through the other relay").await;
    assert_eq!(
        conn.selected_path().map(|p| p.kind),
        Some(PathKind::Relayed(other.clone()))
    );
    accepted.await.unwrap();
    c.close().await;
    a.close().await;
    for server in servers {
        server.shutdown().await;
    }
}
