//! Hostile clients that attack the broker's connection handling, while a witness client's QoS 1
//! traffic goes on ([`support::witness`]).
//!
//! - 1,000 sockets that open and send nothing, and 1,000 that send one byte a second of what
//!   comes first (CONNECT over TCP, a ClientHello over TLS, the HTTP upgrade over WebSocket),
//!   and a few that complete the TLS handshake or the WebSocket upgrade and then send CONNECT
//!   one byte a second: all are closed at `connect_timeout` counted from when the broker
//!   accepted them, which no byte extends.
//! - A connect flood of 5,000 new connections a second from 5 source addresses, against
//!   `max_connection_rate` and `max_connections`: the broker admits what the limits allow, no
//!   more, and counts each refusal.
//! - A QUIC client subscribed on two data streams stops reading one while 8 publishers send
//!   at full rate to its topic: the broker drops what the stalled stream cannot take, and the
//!   same connection's other stream and control stream, and other clients, go on.
//!
//! For each case the broker's resident memory stays within a stated margin of its level
//! before the attack, the witness's p99 round trip stays under 20 ms (reported only for the
//! stalled QUIC stream: see that test), and every message the broker acknowledged to the
//! witness comes back to it. docs/architecture.md ("Hostile clients") has the figures.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

use mqttd_proto::{Packet, ProtocolVersion};

use support::witness::under_witness;
use support::{connect_packet, encode, within, Broker, RawConn, Received};

/// A hang bound for any single step.
const STEP: Duration = Duration::from_secs(30);
const V5: ProtocolVersion = ProtocolVersion::V5;

// ---------------------------------------------------------------------------------------------
// Idle and slowloris sockets
// ---------------------------------------------------------------------------------------------

/// `connect_timeout` in these tests, in seconds.
const CONNECT_TIMEOUT: u64 = 2;
/// Sockets that send nothing, per pass.
const SILENT: usize = 1_000;
/// Sockets that send one byte a second of the first thing their transport expects, per pass.
const TRICKLING: usize = 1_000;
/// Sockets (TLS and WebSocket) that complete the handshake, then send CONNECT one byte a
/// second, per pass: few, since each costs the test a real handshake.
const TRICKLING_CONNECT: usize = 20;
/// How late after the deadline a socket may be closed: the broker closes 2,000 sockets at
/// once, and a busy debug build takes its time. A trickler whose bytes extended the deadline
/// would stay open for as many seconds as it has bytes (20 or more).
const CLOSE_SLACK: Duration = Duration::from_secs(4);
/// Memory the broker may add while it holds the 2,000 sockets before their deadline: measured
/// on a debug build, +6 MiB (TCP), +8 MiB (WebSocket), +11 MiB (TLS).
const IDLE_RSS_MARGIN: u64 = 24 * 1024 * 1024;

/// The transports the idle and slowloris sockets use.
#[derive(Clone, Copy, Debug)]
enum Transport {
    Tcp,
    Tls,
    WebSocket,
}

/// What each socket of a pass saw: how long after its connection was established the broker
/// closed it.
#[derive(Default)]
struct Closed {
    silent: Vec<Duration>,
    trickling: Vec<Duration>,
    trickling_connect: Vec<Duration>,
}

/// A rustls client configuration that trusts nothing: it makes ClientHellos, and the
/// handshakes of clients that trust `ca_pem`.
fn client_tls(ca_pem: Option<&str>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = ca_pem {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("add CA");
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// The bytes of a real ClientHello for `localhost`.
fn client_hello(tls: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let mut hello = Vec::new();
    rustls::ClientConnection::new(
        tls.clone(),
        ServerName::try_from("localhost").expect("name"),
    )
    .expect("client connection")
    .write_tls(&mut hello)
    .expect("ClientHello");
    hello
}

/// An HTTP request upgrading to MQTT over WebSocket.
fn upgrade_request() -> Vec<u8> {
    b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
      Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
      Sec-WebSocket-Protocol: mqtt\r\n\r\n"
        .to_vec()
}

/// A masked binary WebSocket frame carrying `payload` (under 126 bytes), as a client sends.
fn ws_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![0x82, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Upgrades `stream` to WebSocket: sends the request, reads the response's head.
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    stream
        .write_all(&upgrade_request())
        .await
        .expect("upgrade request");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).await.expect("upgrade response");
        assert_eq!(n, 1, "closed during the upgrade: {head:?}");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
}

/// Waits until the broker closes `stream` (end of stream or an error), reading and discarding
/// whatever it sends, for at most `limit`; whether it closed.
async fn closed_within<S: AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    let closed = async { while let Ok(1..) = stream.read(&mut buf).await {} };
    tokio::time::timeout(limit, closed).await.is_ok()
}

/// Sends `chunks` one a second on `stream` until the broker closes it; how long that took
/// from `since`. Panics if every chunk went out and the connection is still open.
async fn trickle<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    chunks: Vec<Vec<u8>>,
    since: Instant,
) -> Duration {
    for chunk in &chunks {
        let sent = async {
            stream.write_all(chunk).await?;
            stream.flush().await
        };
        if sent.await.is_err() || closed_within(&mut stream, Duration::from_secs(1)).await {
            return since.elapsed();
        }
    }
    panic!(
        "a trickling socket was still open after {} bytes and {:?}",
        chunks.len(),
        since.elapsed()
    );
}

/// One pass of the idle and slowloris attack on `transport`: opens [`SILENT`] sockets that
/// send nothing, [`TRICKLING`] that trickle the first thing the transport expects and (TLS and
/// WebSocket) [`TRICKLING_CONNECT`] that trickle CONNECT after the handshake; waits until the
/// broker has closed each.
async fn idle_and_slowloris(
    broker_addr: SocketAddr,
    transport: Transport,
    tls: Arc<rustls::ClientConfig>,
) -> Closed {
    let connect_bytes = encode(V5, &connect_packet(V5, "slowloris"));
    let first: Vec<Vec<u8>> = match transport {
        Transport::Tcp => connect_bytes.iter().map(|b| vec![*b]).collect(),
        Transport::Tls => client_hello(&tls).iter().map(|b| vec![*b]).collect(),
        Transport::WebSocket => upgrade_request().iter().map(|b| vec![*b]).collect(),
    };
    assert!(first.len() as u64 > CONNECT_TIMEOUT * 5, "enough bytes");
    let limit = Duration::from_secs(CONNECT_TIMEOUT) + CLOSE_SLACK;
    let mut silent = JoinSet::new();
    let mut trickling = JoinSet::new();
    // Connected one after the other, so that no SYN waits for room in the accept queue: each
    // socket's clock starts once it is connected, before the broker accepts it.
    for _ in 0..SILENT {
        let mut stream = within(STEP, "connect", TcpStream::connect(broker_addr))
            .await
            .expect("connect");
        let since = Instant::now();
        silent.spawn(async move {
            let closed = closed_within(&mut stream, limit + STEP).await;
            assert!(closed, "a silent socket was not closed");
            since.elapsed()
        });
    }
    for _ in 0..TRICKLING {
        let stream = within(STEP, "connect", TcpStream::connect(broker_addr))
            .await
            .expect("connect");
        let since = Instant::now();
        trickling.spawn(trickle(stream, first.clone(), since));
    }
    let mut after_handshake = JoinSet::new();
    for _ in 0..TRICKLING_CONNECT {
        let tls = tls.clone();
        let connect_bytes = connect_bytes.clone();
        match transport {
            Transport::Tcp => break,
            Transport::Tls => {
                let stream = within(STEP, "connect", TcpStream::connect(broker_addr))
                    .await
                    .expect("connect");
                let since = Instant::now();
                let handshake = tokio_rustls::TlsConnector::from(tls)
                    .connect(ServerName::try_from("localhost").expect("name"), stream);
                let stream = within(STEP, "TLS handshake", handshake)
                    .await
                    .expect("TLS handshake");
                let bytes = connect_bytes.iter().map(|b| vec![*b]).collect();
                after_handshake.spawn(trickle(stream, bytes, since));
            }
            Transport::WebSocket => {
                let mut stream = within(STEP, "connect", TcpStream::connect(broker_addr))
                    .await
                    .expect("connect");
                let since = Instant::now();
                within(STEP, "WebSocket upgrade", upgrade(&mut stream)).await;
                let frames = connect_bytes.iter().map(|b| ws_frame(&[*b])).collect();
                after_handshake.spawn(trickle(stream, frames, since));
            }
        }
    }
    let collect = |mut set: JoinSet<Duration>, what: &'static str| async move {
        let mut all = Vec::new();
        while let Some(done) = within(limit + STEP, what, set.join_next()).await {
            all.push(done.expect(what));
        }
        all
    };
    Closed {
        silent: collect(silent, "silent sockets").await,
        trickling: collect(trickling, "trickling sockets").await,
        trickling_connect: collect(after_handshake, "sockets trickling CONNECT").await,
    }
}

/// Runs the idle and slowloris attack on `transport` under the witness, and checks that every
/// socket was closed at the CONNECT deadline.
async fn idle_and_slowloris_on(transport: Transport) {
    let config =
        format!("persistence = false\nsys_interval = 0\nconnect_timeout = {CONNECT_TIMEOUT}\n");
    let broker = match transport {
        Transport::Tls => Broker::start_with(&config, &["tls://127.0.0.1:0"]),
        _ => Broker::start(&config),
    };
    let (addr, tls) = match transport {
        Transport::Tcp => (broker.mqtt, client_tls(None)),
        Transport::Tls => {
            let ca = std::fs::read_to_string(broker.data_dir().join("tls").join("ca.pem"))
                .expect("the generated CA");
            (broker.tls, client_tls(Some(&ca)))
        }
        Transport::WebSocket => (broker.ws, client_tls(None)),
    };
    let case = format!("idle and slowloris over {transport:?}");
    let passes = under_witness(&broker, &case, IDLE_RSS_MARGIN, || {
        idle_and_slowloris(addr, transport, tls.clone())
    })
    .await;
    let deadline = Duration::from_secs(CONNECT_TIMEOUT);
    // A socket's clock starts when the test's task sees it connected, which on a busy machine
    // can be after the broker accepted it (45 ms seen); a broker that closed on the first bytes,
    // or a second after them, would be far below.
    let earliest = deadline - Duration::from_millis(250);
    let latest = deadline + CLOSE_SLACK;
    for pass in &passes {
        let expected = match transport {
            Transport::Tcp => 0,
            _ => TRICKLING_CONNECT,
        };
        assert_eq!(pass.silent.len(), SILENT);
        assert_eq!(pass.trickling.len(), TRICKLING);
        assert_eq!(pass.trickling_connect.len(), expected);
        for (what, closes) in [
            ("silent", &pass.silent),
            ("trickling", &pass.trickling),
            (
                "trickling CONNECT after the handshake",
                &pass.trickling_connect,
            ),
        ] {
            let Some(first) = closes.iter().min() else {
                continue;
            };
            let last = closes.iter().max().expect("not empty");
            eprintln!("{case}: {what} sockets closed after {first:?} to {last:?}");
            assert!(
                *first >= earliest && *last <= latest,
                "{case}: {what} sockets closed after {first:?} to {last:?}, \
                 expected between {earliest:?} and {latest:?}"
            );
        }
    }
    // Nothing is left open (the witness has left too).
    let metrics = broker
        .wait_for_metrics(STEP, |m| m.get("mqttd_connections_open") <= 0.0)
        .await;
    assert_eq!(metrics.get("mqttd_connections_open"), 0.0);
    if let Transport::Tls = transport {
        assert_eq!(
            metrics.get("mqttd_tls_handshake_timeouts_total"),
            (passes.len() * (SILENT + TRICKLING)) as f64
        );
    }
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slowloris_tcp_sockets_are_closed_at_the_connect_deadline() {
    idle_and_slowloris_on(Transport::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slowloris_tls_sockets_are_closed_at_the_connect_deadline() {
    idle_and_slowloris_on(Transport::Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slowloris_websocket_sockets_are_closed_at_the_connect_deadline() {
    idle_and_slowloris_on(Transport::WebSocket).await;
}

// ---------------------------------------------------------------------------------------------
// Connect flood
// ---------------------------------------------------------------------------------------------

/// Source addresses of the flood: 127.0.0.2 and on.
const SOURCES: usize = 5;
/// New connections a second the flood attempts, over all its sources.
const FLOOD_RATE: usize = 5_000;
/// `max_connection_rate`: new connections a second from one address.
const MAX_CONNECTION_RATE: usize = 50;
/// `max_connections`. Above what one second of the rate limit admits from all sources
/// ([`SOURCES`] x [`MAX_CONNECTION_RATE`] = 250), so that connections that leave at once are
/// never refused for it; below what the rate admits in two seconds, so that connections that
/// stay reach it.
const MAX_CONNECTIONS: usize = 300;
/// Memory the broker may add during the flood: [`MAX_CONNECTIONS`] connections at most, and
/// the churn of the others. Measured on a debug build: see the test's output.
const FLOOD_RSS_MARGIN: u64 = 24 * 1024 * 1024;

/// What one phase of the flood saw, per source address.
struct Flooded {
    /// Connections that got a successful CONNACK.
    accepted: Vec<usize>,
    /// Connections the broker closed before CONNACK.
    refused: Vec<usize>,
    /// From the first attempt to the last.
    took: Duration,
}

/// The address of flood source `i`.
fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8))
}

/// One connection of the flood from `from`: whether the broker accepted it (a successful
/// CONNACK) or closed it before, counted in `tally` as soon as known. An accepted one is held
/// until `release` says so if `hold`, else closed at once; either way with a reset, which
/// leaves no TIME_WAIT behind.
async fn flood_connection(
    addr: SocketAddr,
    from: usize,
    client_id: String,
    hold: Option<tokio::sync::watch::Receiver<bool>>,
    tally: Arc<Tally>,
) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(source(from), 0)).expect("bind");
    let stream = within(STEP, "connect", socket.connect(addr))
        .await
        .expect("connect");
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    let mut conn = RawConn::from_stream(stream, V5);
    let accepted = match conn
        .send(&encode(V5, &connect_packet(V5, &client_id)))
        .await
    {
        Err(_) => false,
        Ok(()) => match conn.recv(STEP).await {
            Received::Packet(p) => match *p {
                Packet::ConnAck(ack) if !ack.reason.is_error() => true,
                other => panic!("{client_id}: got {other:?}"),
            },
            Received::Closed => false,
            other => panic!("{client_id}: neither CONNACK nor a close: {other:?}"),
        },
    };
    let counter = if accepted {
        &tally.accepted[from]
    } else {
        &tally.refused[from]
    };
    counter.fetch_add(1, Ordering::Relaxed);
    if let (true, Some(mut release)) = (accepted, hold) {
        let _ = release.wait_for(|go| *go).await;
    }
}

/// Connections accepted and refused so far, per source.
struct Tally {
    accepted: Vec<AtomicU64>,
    refused: Vec<AtomicU64>,
}

impl Tally {
    fn answered(&self) -> u64 {
        self.accepted
            .iter()
            .chain(&self.refused)
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// Floods `addr` for `duration` at [`FLOOD_RATE`] from the [`SOURCES`] addresses in turn; if
/// `hold`, the accepted connections stay open until every attempt has its answer.
async fn flood(addr: SocketAddr, phase: &str, duration: Duration, hold: bool) -> Flooded {
    const TICK: Duration = Duration::from_millis(10);
    let per_tick = FLOOD_RATE / 100;
    let attempts = (FLOOD_RATE as f64 * duration.as_secs_f64()) as usize;
    let (release, held) = tokio::sync::watch::channel(false);
    let tally = Arc::new(Tally {
        accepted: (0..SOURCES).map(|_| AtomicU64::new(0)).collect(),
        refused: (0..SOURCES).map(|_| AtomicU64::new(0)).collect(),
    });
    let mut tasks = JoinSet::new();
    let started = tokio::time::Instant::now();
    for i in 0..attempts {
        if i % per_tick == 0 {
            tokio::time::sleep_until(started + TICK * (i / per_tick) as u32).await;
        }
        let hold = hold.then(|| held.clone());
        tasks.spawn(flood_connection(
            addr,
            i % SOURCES,
            format!("{phase}-{i}"),
            hold,
            tally.clone(),
        ));
        // Collect what is done as it goes, so that finished tasks do not pile up.
        while let Some(done) = tasks.try_join_next() {
            done.expect("flood connection");
        }
    }
    let took = started.elapsed();
    let deadline = Instant::now() + STEP;
    while tally.answered() < attempts as u64 {
        assert!(
            Instant::now() < deadline,
            "{phase}: {} of {attempts} flood attempts answered",
            tally.answered()
        );
        tokio::time::sleep(TICK).await;
    }
    let _ = release.send(true);
    while let Some(done) = within(STEP, "flood connections closed", tasks.join_next()).await {
        done.expect("flood connection");
    }
    let load = |c: &Vec<AtomicU64>| {
        c.iter()
            .map(|c| c.load(Ordering::Relaxed) as usize)
            .collect()
    };
    Flooded {
        accepted: load(&tally.accepted),
        refused: load(&tally.refused),
        took,
    }
}

/// The broker's counters of connections accepted and refused by its listeners.
async fn admissions(broker: &Broker) -> (f64, f64) {
    let m = broker.wait_for_metrics(STEP, |_| true).await;
    (
        m.get("mqttd_connections_accepted_total"),
        m.get("mqttd_connections_refused_total"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_flood_from_several_addresses_meets_the_rate_and_connection_limits() {
    let broker = Broker::start(&format!(
        "persistence = false\nsys_interval = 0\nmax_connection_rate = {MAX_CONNECTION_RATE}\n\
         max_connections = {MAX_CONNECTIONS}\n"
    ));
    let addr = broker.mqtt;
    let broker_ref = &broker;
    let passes = under_witness(
        &broker,
        "connect flood",
        FLOOD_RSS_MARGIN,
        move || async move {
            let open_only_witness = |m: &support::Metrics| m.get("mqttd_connections_open") <= 1.0;
            let before = admissions(broker_ref).await;
            // Connections that leave as soon as they are in: only the rate limit refuses them.
            let leaving = flood(addr, "leaving", Duration::from_secs(1), false).await;
            broker_ref.wait_for_metrics(STEP, open_only_witness).await;
            // Connections that stay: past max_connections the rest are refused too. 2.5 s holds
            // two windows of the rate limit that start within it, whatever the last phase left.
            let staying = flood(addr, "staying", Duration::from_millis(2_500), true).await;
            broker_ref.wait_for_metrics(STEP, open_only_witness).await;
            let after = admissions(broker_ref).await;
            (leaving, staying, after.0 - before.0, after.1 - before.1)
        },
    )
    .await;
    // One rate window per started second, and one more that began before.
    let rate_bound =
        |took: Duration| MAX_CONNECTION_RATE * (took.as_secs_f64().ceil() as usize + 1);
    for (leaving, staying, accepted_counted, refused_counted) in &passes {
        let sum = |v: &Vec<usize>| v.iter().sum::<usize>();
        eprintln!(
            "connect flood: leaving: {} attempts in {:?}, accepted per source {:?}; \
             staying: {} attempts in {:?}, accepted per source {:?}",
            sum(&leaving.accepted) + sum(&leaving.refused),
            leaving.took,
            leaving.accepted,
            sum(&staying.accepted) + sum(&staying.refused),
            staying.took,
            staying.accepted,
        );
        for from in 0..SOURCES {
            assert!(
                (MAX_CONNECTION_RATE..=rate_bound(leaving.took)).contains(&leaving.accepted[from]),
                "leaving: {} accepted from {}, rate limit {MAX_CONNECTION_RATE}/s over {:?}",
                leaving.accepted[from],
                source(from),
                leaving.took
            );
            assert!(
                staying.accepted[from] <= rate_bound(staying.took),
                "staying: {} accepted from {}",
                staying.accepted[from],
                source(from)
            );
        }
        // The witness holds the last connection.
        assert_eq!(
            sum(&staying.accepted),
            MAX_CONNECTIONS - 1,
            "staying: accepted"
        );
        // Every refusal is counted, and nothing else.
        assert_eq!(
            *accepted_counted,
            (sum(&leaving.accepted) + sum(&staying.accepted)) as f64,
            "mqttd_connections_accepted_total"
        );
        assert_eq!(
            *refused_counted,
            (sum(&leaving.refused) + sum(&staying.refused)) as f64,
            "mqttd_connections_refused_total"
        );
    }
    broker.stop();
}

// ---------------------------------------------------------------------------------------------
// A stalled QUIC stream
// ---------------------------------------------------------------------------------------------

/// Publishers sending at full rate towards the stalled stream.
const PUBLISHERS: usize = 8;
/// QoS 0 messages each publisher sends per pass.
const PER_PUBLISHER: usize = 4_000;
/// Their payload: 8 x 4,000 x 1 KiB = 31 MiB per pass towards the stalled stream.
const STALLED_PAYLOAD: usize = 1024;
/// Memory the broker may add while it holds the stalled stream's backlog: its bounded output
/// and session queue, not what is published towards it. Measured on a debug build: see the
/// test's output.
const STALL_RSS_MARGIN: u64 = 32 * 1024 * 1024;

/// One QUIC stream (or a TCP connection) carrying MQTT 5 packets.
struct PacketStream<S> {
    io: S,
    reader: mqttd_proto::codec::PacketReader,
    buf: bytes::BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> PacketStream<S> {
    fn new(io: S) -> Self {
        Self {
            io,
            reader: mqttd_proto::codec::PacketReader::new(u32::MAX),
            buf: bytes::BytesMut::new(),
        }
    }

    async fn send(&mut self, packet: &Packet) {
        self.io
            .write_all(&encode(V5, packet))
            .await
            .expect("write a packet");
        self.io.flush().await.expect("flush");
    }

    /// The next packet, within [`STEP`].
    async fn next(&mut self, what: &str) -> Packet {
        loop {
            match self.reader.read(&mut self.buf, Some(V5)) {
                Ok(Some(packet)) => return packet,
                Ok(None) => {}
                Err(e) => panic!("{what}: undecodable: {e}"),
            }
            let n = within(STEP, what, self.io.read_buf(&mut self.buf))
                .await
                .expect("read");
            assert!(n > 0, "{what}: closed");
        }
    }
}

/// A QUIC client of `broker` trusting its generated CA.
fn quic_endpoint(broker: &Broker) -> noq::Endpoint {
    let ca = std::fs::read_to_string(broker.data_dir().join("tls").join("ca.pem")).expect("CA");
    let mut tls = (*client_tls(Some(&ca))).clone();
    tls.alpn_protocols = vec![b"mqtt".to_vec()];
    let crypto = noq::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC config");
    let endpoint =
        noq::Endpoint::client("127.0.0.1:0".parse().expect("address")).expect("UDP socket");
    endpoint.set_default_client_config(noq::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

/// A publisher sending [`PER_PUBLISHER`] QoS 0 messages to `topic` as fast as the broker
/// reads them.
async fn full_rate_publisher(addr: SocketAddr, name: String, topic: &'static str) {
    let conn = RawConn::connected(addr, V5, &name).await;
    let (mut stream, _) = conn.into_parts();
    let one = encode(
        V5,
        &support::publish_packet(
            topic,
            vec![b'x'; STALLED_PAYLOAD],
            mqttd_proto::QoS::AtMostOnce,
            false,
            0,
        ),
    );
    let batch: Vec<u8> = one.repeat(16);
    for _ in 0..PER_PUBLISHER / 16 {
        within(STEP, "publish", stream.write_all(&batch))
            .await
            .expect("PUBLISH");
    }
    // DISCONNECT, so that every message is routed before the connection ends.
    let mut disconnect = bytes::BytesMut::new();
    Packet::Disconnect(mqttd_proto::Disconnect::new(
        mqttd_proto::ReasonCode::Success,
    ))
    .encode(V5, &mut disconnect)
    .expect("DISCONNECT");
    stream.write_all(&disconnect).await.expect("DISCONNECT");
    let mut rest = Vec::new();
    let _ = within(STEP, "publisher closed", stream.read_to_end(&mut rest)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_quic_stream_affects_neither_its_connections_other_streams_nor_other_clients() {
    use mqttd_proto::{PubResponse, QoS};
    let broker = Broker::start_with(
        "persistence = false\nsys_interval = 0\n",
        &["quic://127.0.0.1:0"],
    );
    let endpoint = quic_endpoint(&broker);
    let conn = within(
        STEP,
        "QUIC handshake",
        endpoint.connect(broker.quic, "localhost").expect("connect"),
    )
    .await
    .expect("QUIC handshake");
    // The control stream: CONNECT.
    let (send, recv) = conn.open_bi().await.expect("control stream");
    let mut control = PacketStream::new(tokio::io::join(recv, send));
    control.send(&connect_packet(V5, "multi-stream")).await;
    match control.next("CONNACK").await {
        Packet::ConnAck(ack) if !ack.reason.is_error() => {}
        other => panic!("expected a successful CONNACK, got {other:?}"),
    }
    // A data stream that subscribes to what the publishers send, then never reads again.
    let (send, recv) = conn.open_bi().await.expect("stalled stream");
    let mut stalled = PacketStream::new(tokio::io::join(recv, send));
    stalled
        .send(&support::subscribe_packet(1, "stall/t", QoS::AtLeastOnce))
        .await;
    assert!(matches!(stalled.next("SUBACK").await, Packet::SubAck(_)));
    // A data stream of the same connection that exchanges QoS 1 messages with itself.
    let (send, recv) = conn.open_bi().await.expect("live stream");
    let live = PacketStream::new(tokio::io::join(recv, send));
    let live = Arc::new(tokio::sync::Mutex::new(live));
    live.lock()
        .await
        .send(&support::subscribe_packet(2, "live/t", QoS::AtLeastOnce))
        .await;
    assert!(matches!(
        live.lock().await.next("SUBACK").await,
        Packet::SubAck(_)
    ));
    let sequence = Arc::new(AtomicU64::new(0));

    let addr = broker.mqtt;
    // The p99 is reported, not asserted: 8 publishers at full rate take both cores of the CI
    // machine, and the witness's p99 is over 20 ms with them alone, no stream stalled (32 ms
    // measured, debug build).
    let bounds = support::witness::Bounds {
        rss_margin: STALL_RSS_MARGIN,
        p99_asserted: false,
    };
    let passes =
        support::witness::under_witness_within(&broker, "stalled QUIC stream", bounds, || {
            let (live, sequence) = (live.clone(), sequence.clone());
            async move {
                let mut publishers = JoinSet::new();
                for p in 0..PUBLISHERS {
                    publishers.spawn(full_rate_publisher(
                        addr,
                        format!("publisher-{p}"),
                        "stall/t",
                    ));
                }
                // Round trips on the live stream while the publishers run: each acknowledged and
                // delivered, in order.
                let mut live = live.lock().await;
                let mut round_trips = 0u64;
                while !publishers.is_empty() || round_trips == 0 {
                    while let Some(done) = publishers.try_join_next() {
                        done.expect("publisher");
                    }
                    let n = sequence.fetch_add(1, Ordering::Relaxed) + 1;
                    let id = (n % 65_535 + 1) as u16;
                    live.send(&support::publish_packet(
                        "live/t",
                        n.to_be_bytes().to_vec(),
                        QoS::AtLeastOnce,
                        false,
                        id,
                    ))
                    .await;
                    let (mut acked, mut delivered) = (false, false);
                    while !(acked && delivered) {
                        match live.next("the live stream's round trip").await {
                            Packet::PubAck(ack) if ack.packet_id.get() == id => {
                                assert!(!ack.reason.is_error(), "live message {n}: {ack:?}");
                                acked = true;
                            }
                            Packet::Publish(p) => {
                                assert_eq!(&p.payload[..], n.to_be_bytes(), "live stream order");
                                if let Some(pid) = p.packet_id {
                                    live.send(&Packet::PubAck(PubResponse::success(pid))).await;
                                }
                                delivered = true;
                            }
                            other => panic!("live stream: unexpected {other:?}"),
                        }
                    }
                    round_trips += 1;
                }
                round_trips
            }
        })
        .await;
    let metrics = broker.wait_for_metrics(STEP, |_| true).await;
    let published = (passes.len() * PUBLISHERS * PER_PUBLISHER) as f64;
    eprintln!(
        "stalled QUIC stream: {} passes, {published} messages towards the stalled stream, \
         {} dropped; live stream round trips per pass {passes:?}",
        passes.len(),
        metrics.get("mqttd_messages_dropped_total"),
    );
    // The stalled stream really was: most of what was published towards it was dropped.
    assert!(
        metrics.get("mqttd_messages_dropped_total") > published / 2.0,
        "dropped {} of {published}",
        metrics.get("mqttd_messages_dropped_total")
    );
    // The connection is still there, its control stream answering.
    control.send(&Packet::PingReq).await;
    assert!(matches!(control.next("PINGRESP").await, Packet::PingResp));
    drop((stalled, live, control));
    conn.close(0u32.into(), b"done");
    broker.stop();
}
