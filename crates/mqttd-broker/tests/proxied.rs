//! Clients behind a proxy: the address the broker gives a client (as hooks see it in
//! [`Peer::addr`]) comes from the PROXY protocol header on listeners with `proxy_protocol`
//! (TCP, TLS, WS, WSS), and from `Forwarded` or `X-Forwarded-For` on WebSocket listeners
//! with `trust_proxy`; from the socket otherwise. A connection without a valid header is closed, alone.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use mqttd_broker::{Broker, ClientInfo, Config, Hooks, ListenerKind, Transport};
use mqttd_proto::codec::PacketReader;
use mqttd_proto::{ClientId, Connect, ConnectProperties, Packet, ProtocolVersion};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

/// Upper bound for anything that must happen; only a hang reaches it.
const WAIT: Duration = Duration::from_secs(30);
const V5: ProtocolVersion = ProtocolVersion::V5;

/// Records where each connected client came from.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, SocketAddr, Transport)>>>);

impl Hooks for Seen {
    fn on_connected(&self, client: &ClientInfo) {
        self.0.lock().unwrap().push((
            client.client_id.to_string(),
            client.peer.addr,
            client.peer.transport,
        ));
    }
}

impl Seen {
    fn addr_of(&self, id: &str) -> Option<SocketAddr> {
        let seen = self.0.lock().unwrap();
        seen.iter().find(|(c, _, _)| c == id).map(|(_, a, _)| *a)
    }
}

async fn start(
    listen: &[&str],
    config: impl FnOnce(&mut Config),
) -> (Broker, Seen, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::default();
    c.listen = listen.iter().map(|s| (*s).to_owned()).collect();
    c.data_dir = dir.path().join("data");
    c.persistence = false;
    config(&mut c);
    let seen = Seen::default();
    let broker = Broker::builder(c)
        .hooks(seen.clone())
        .start()
        .await
        .unwrap();
    (broker, seen, dir)
}

fn connect(id: &str) -> Vec<u8> {
    let packet = Packet::Connect(Box::new(Connect {
        protocol: V5,
        clean_start: true,
        keep_alive: 60,
        client_id: ClientId::try_from(id).unwrap(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }));
    let mut buf = BytesMut::new();
    packet.encode(V5, &mut buf).unwrap();
    buf.to_vec()
}

/// Reads from `stream` until a CONNACK decodes (`true`) or the broker closes (`false`).
async fn connack<S: AsyncReadExt + Unpin>(stream: &mut S, mut buf: BytesMut) -> bool {
    let mut reader = PacketReader::new(u32::MAX);
    loop {
        if let Ok(Some(p)) = reader.read(&mut buf, Some(V5)) {
            return matches!(p, Packet::ConnAck(ack) if !ack.reason.is_error());
        }
        match timeout(WAIT, stream.read_buf(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return false,
            Ok(Ok(_)) => {}
            Err(_) => panic!("neither a CONNACK nor a close"),
        }
    }
}

/// Sends `prefix` then a CONNECT for `id` on a new TCP connection; whether it was accepted.
async fn connect_with_prefix(addr: SocketAddr, prefix: &[u8], id: &str) -> bool {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut bytes = prefix.to_vec();
    bytes.extend(connect(id));
    // A refused connection may be closed before all of it is written.
    let _ = s.write_all(&bytes).await;
    connack(&mut s, BytesMut::new()).await
}

fn v2_header(command: u8, src: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x20 | command, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&1883u16.to_be_bytes());
    h
}

#[tokio::test]
async fn proxy_protocol_headers_name_the_client() {
    let (broker, seen, _dir) = start(&["tcp://127.0.0.1:0?proxy_protocol=true"], |_| {}).await;
    let addr = broker.addr(ListenerKind::Tcp).unwrap();

    assert!(
        connect_with_prefix(addr, b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 1883\r\n", "v1").await
    );
    assert!(
        connect_with_prefix(addr, b"PROXY TCP6 2001:db8::7 ::1 4711 1883\r\n", "v1-ipv6").await
    );
    assert!(connect_with_prefix(addr, &v2_header(1, [198, 51, 100, 9], 40000), "v2").await);
    // LOCAL (a health check from the proxy) and UNKNOWN keep the socket's address.
    assert!(connect_with_prefix(addr, &v2_header(0, [198, 51, 100, 9], 1), "v2-local").await);
    assert!(connect_with_prefix(addr, b"PROXY UNKNOWN\r\n", "v1-unknown").await);

    assert_eq!(seen.addr_of("v1"), Some("192.0.2.7:51000".parse().unwrap()));
    assert_eq!(
        seen.addr_of("v1-ipv6"),
        Some("[2001:db8::7]:4711".parse().unwrap())
    );
    assert_eq!(
        seen.addr_of("v2"),
        Some("198.51.100.9:40000".parse().unwrap())
    );
    for local in ["v2-local", "v1-unknown"] {
        let a = seen.addr_of(local).unwrap();
        assert!(a.ip().is_loopback(), "{local}: {a}");
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn a_connection_without_a_valid_header_is_closed_alone() {
    let (broker, seen, _dir) = start(&["tcp://127.0.0.1:0?proxy_protocol=true"], |_| {}).await;
    let addr = broker.addr(ListenerKind::Tcp).unwrap();

    // A witness behind the proxy stays connected throughout.
    let mut witness = TcpStream::connect(addr).await.unwrap();
    let mut hello = b"PROXY TCP4 192.0.2.1 127.0.0.1 1 1883\r\n".to_vec();
    hello.extend(connect("witness"));
    witness.write_all(&hello).await.unwrap();
    assert!(connack(&mut witness, BytesMut::new()).await);

    let too_long = format!(
        "PROXY TCP4 192.0.2.7 127.0.0.1 51000 1883{}\r\n",
        " on".repeat(40)
    );
    let garbage: Vec<&[u8]> = vec![
        b"",                                              // MQTT straight away
        b"GET / HTTP/1.1\r\n\r\n",                        // not a header at all
        b"PROXY TCP4 999.0.2.7 127.0.0.1 51000 1883\r\n", // a bad address
        b"PROXY TCP4 192.0.2.7 127.0.0.1 51000\r\n",      // a missing port
        too_long.as_bytes(),                              // no end within 107 bytes
        b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x0c",          // version 3
    ];
    for (i, prefix) in garbage.iter().enumerate() {
        assert!(
            !connect_with_prefix(addr, prefix, &format!("bad-{i}")).await,
            "garbage {i} was accepted"
        );
    }
    assert_eq!(
        seen.0.lock().unwrap().len(),
        1,
        "only the witness connected"
    );

    // The witness still works.
    let mut ping = BytesMut::new();
    Packet::PingReq.encode(V5, &mut ping).unwrap();
    witness.write_all(&ping).await.unwrap();
    let mut buf = [0u8; 2];
    timeout(WAIT, witness.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, [0xd0, 0]);
    broker.shutdown().await;
}

/// Opens a WebSocket connection with `extra` header lines and connects `id` over it.
async fn ws_connect(addr: SocketAddr, extra: &str, id: &str) -> bool {
    ws_connect_over(TcpStream::connect(addr).await.unwrap(), extra, id).await
}

/// Sends `prefix` on a new TCP connection, then opens a WebSocket connection over it with
/// `extra` header lines and connects `id`.
async fn ws_connect_with_prefix(addr: SocketAddr, prefix: &[u8], extra: &str, id: &str) -> bool {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(prefix).await.unwrap();
    ws_connect_over(s, extra, id).await
}

/// Upgrades `s` to WebSocket with `extra` header lines and connects `id` over it; `false` if
/// the broker closes first.
async fn ws_connect_over<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    extra: &str,
    id: &str,
) -> bool {
    let request = format!(
        "GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n{extra}\r\n"
    );
    // A refused connection may be closed before all of it is written.
    let _ = s.write_all(request.as_bytes()).await;
    let mut head = BytesMut::new();
    let end = loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        match timeout(WAIT, s.read_buf(&mut head)).await {
            Ok(Ok(0) | Err(_)) => return false,
            Ok(Ok(_)) => {}
            Err(_) => panic!("neither an upgrade nor a close"),
        }
    };
    assert!(head.starts_with(b"HTTP/1.1 101 "));
    // One binary frame, masked with zeros (XOR with 0 leaves the payload as it is).
    let payload = connect(id);
    let mut frame = vec![0x82, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend(payload);
    s.write_all(&frame).await.unwrap();
    // The CONNACK comes in one small binary frame: strip its 2-byte header.
    let mut rest = head.split_off(end);
    while rest.len() < 2 {
        if timeout(WAIT, s.read_buf(&mut rest)).await.unwrap().unwrap() == 0 {
            return false;
        }
    }
    assert_eq!(rest[0], 0x82);
    let _ = rest.split_to(2);
    connack(&mut s, rest).await
}

/// A TLS client that trusts the CA the broker generated under `dir`.
fn tls_connector(dir: &tempfile::TempDir) -> TlsConnector {
    let ca = dir.path().join("data/tls/ca.pem");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// Sends `prefix` on a new TCP connection, then TLS, WebSocket and a CONNECT for `id` with
/// `extra` header lines in the upgrade; whether it was accepted.
async fn wss_connect_with_prefix(
    tls: &TlsConnector,
    addr: SocketAddr,
    prefix: &[u8],
    extra: &str,
    id: &str,
) -> bool {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(prefix).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    match timeout(WAIT, tls.connect(name, s)).await.unwrap() {
        Ok(stream) => ws_connect_over(stream, extra, id).await,
        Err(_) => false,
    }
}

#[tokio::test]
async fn forwarding_headers_are_honoured_only_with_trust_proxy() {
    let (broker, seen, _dir) = start(
        &[
            "ws://127.0.0.1:0/mqtt?trust_proxy=true",
            "ws://127.0.0.1:0/mqtt",
        ],
        |_| {},
    )
    .await;
    let trusted = broker.local_addrs()[0].1;
    let untrusted = broker.local_addrs()[1].1;
    let xff = "X-Forwarded-For: 203.0.113.5, 10.1.1.1\r\n";
    let forwarded = "Forwarded: for=\"[2001:db8::5]:4711\";proto=http, for=10.1.1.1\r\n";

    assert!(ws_connect(trusted, xff, "trusted").await);
    assert!(ws_connect(trusted, forwarded, "trusted-rfc7239").await);
    assert!(ws_connect(untrusted, xff, "untrusted").await);
    assert!(ws_connect(untrusted, forwarded, "untrusted-rfc7239").await);
    assert!(ws_connect(trusted, "", "trusted-direct").await);
    assert!(ws_connect(trusted, "X-Forwarded-For: nonsense\r\n", "trusted-garbled").await);
    let garbled = "Forwarded: for=2001:db8::5\r\n";
    assert!(ws_connect(trusted, garbled, "trusted-garbled-rfc7239").await);
    assert!(ws_connect(trusted, "Forwarded: for=_hidden\r\n", "trusted-hidden").await);

    assert_eq!(
        seen.addr_of("trusted").unwrap().ip(),
        "203.0.113.5".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(
        seen.addr_of("trusted-rfc7239").unwrap().ip(),
        "2001:db8::5".parse::<std::net::IpAddr>().unwrap()
    );
    for direct in [
        "untrusted",
        "untrusted-rfc7239",
        "trusted-direct",
        "trusted-garbled",
        "trusted-garbled-rfc7239",
        "trusted-hidden",
    ] {
        let a = seen.addr_of(direct).unwrap();
        assert!(a.ip().is_loopback(), "{direct}: {a}");
    }
    assert!(seen
        .0
        .lock()
        .unwrap()
        .iter()
        .all(|(_, _, t)| *t == Transport::WebSocket));
    broker.shutdown().await;
}

/// On WebSocket listeners with `proxy_protocol` the header comes first (before TLS on WSS)
/// and names the client, unless a trusted `Forwarded`/`X-Forwarded-For` names one nearer
/// to it; a connection without a valid header is closed.
#[tokio::test]
async fn proxy_protocol_headers_on_websocket_listeners() {
    let (broker, seen, dir) = start(
        &[
            "ws://127.0.0.1:0/mqtt?proxy_protocol=true",
            "wss://127.0.0.1:0/mqtt?proxy_protocol=true&trust_proxy=true",
        ],
        |_| {},
    )
    .await;
    let ws = broker.local_addrs()[0].1;
    let wss = broker.local_addrs()[1].1;
    let tls = tls_connector(&dir);
    let v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 1883\r\n";
    let forwarded = "Forwarded: for=198.51.100.3\r\n";

    assert!(ws_connect_with_prefix(ws, v1, "", "ws").await);
    // Not trusted on this listener: the PROXY header's address stands.
    assert!(ws_connect_with_prefix(ws, v1, forwarded, "ws-forwarded").await);
    assert!(ws_connect_with_prefix(ws, &v2_header(1, [198, 51, 100, 9], 40000), "", "ws-v2").await);
    assert!(wss_connect_with_prefix(&tls, wss, v1, "", "wss").await);
    assert!(wss_connect_with_prefix(&tls, wss, v1, forwarded, "wss-forwarded").await);
    assert!(wss_connect_with_prefix(&tls, wss, b"PROXY UNKNOWN\r\n", "", "wss-unknown").await);

    // Without a valid header, or with the upgrade request where the header should be.
    assert!(!ws_connect_with_prefix(ws, b"", "", "ws-none").await);
    let bad = b"PROXY TCP4 999.0.2.7 127.0.0.1 51000 1883\r\n";
    assert!(!ws_connect_with_prefix(ws, bad, "", "ws-bad").await);
    assert!(!wss_connect_with_prefix(&tls, wss, b"", "", "wss-none").await);
    assert!(!wss_connect_with_prefix(&tls, wss, bad, "", "wss-bad").await);

    let client = "192.0.2.7:51000".parse().unwrap();
    assert_eq!(seen.addr_of("ws"), Some(client));
    assert_eq!(seen.addr_of("ws-forwarded"), Some(client));
    assert_eq!(
        seen.addr_of("ws-v2"),
        Some("198.51.100.9:40000".parse().unwrap())
    );
    assert_eq!(seen.addr_of("wss"), Some(client));
    assert_eq!(
        seen.addr_of("wss-forwarded"),
        Some("198.51.100.3:0".parse().unwrap())
    );
    assert!(seen.addr_of("wss-unknown").unwrap().ip().is_loopback());
    let all = seen.0.lock().unwrap().clone();
    assert_eq!(all.len(), 6, "{all:?}");
    for (id, _, transport) in &all {
        let expected = match id.starts_with("wss") {
            true => Transport::WebSocketTls,
            false => Transport::WebSocket,
        };
        assert_eq!(*transport, expected, "{id}");
    }
    broker.shutdown().await;
}

/// The rate limit of a proxied listener counts clients, not the proxy.
#[tokio::test]
async fn the_rate_limit_counts_the_clients_behind_the_proxy() {
    let (broker, seen, _dir) = start(&["tcp://127.0.0.1:0?proxy_protocol=true"], |c| {
        c.max_connection_rate = 1;
    })
    .await;
    let addr = broker.addr(ListenerKind::Tcp).unwrap();
    // Three clients, all through one proxy address: each is its own first connection.
    for (i, ip) in ["192.0.2.1", "192.0.2.2", "192.0.2.3"].iter().enumerate() {
        let header = format!("PROXY TCP4 {ip} 127.0.0.1 {} 1883\r\n", 1000 + i);
        assert!(connect_with_prefix(addr, header.as_bytes(), &format!("c{i}")).await);
    }
    assert_eq!(seen.0.lock().unwrap().len(), 3);
    broker.shutdown().await;
}

/// Sockets that send nothing, or only the start of a PROXY header, are closed at the CONNECT
/// deadline; a client behind the proxy is served meanwhile.
#[tokio::test]
async fn a_header_that_does_not_come_is_cut_at_the_connect_deadline() {
    let (broker, seen, _dir) = start(&["tcp://127.0.0.1:0?proxy_protocol=true"], |c| {
        c.connect_timeout = 1;
    })
    .await;
    let addr = broker.addr(ListenerKind::Tcp).unwrap();
    let mut silent = Vec::new();
    for i in 0..10 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 1 {
            s.write_all(b"PROXY TCP4 192.0.2.").await.unwrap();
        }
        silent.push(s);
    }
    assert!(
        connect_with_prefix(
            addr,
            b"PROXY TCP4 192.0.2.9 127.0.0.1 9 1883\r\n",
            "witness"
        )
        .await
    );
    let mut closed = 0;
    for mut s in silent {
        let mut buf = [0u8; 8];
        // The deadline is 1 s; the bound only catches a broker that never closes.
        if let Ok(Ok(0) | Err(_)) = timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 10);
    assert_eq!(seen.0.lock().unwrap().len(), 1);
    broker.shutdown().await;
}
