//! MQTT over WebSocket against the real binary, with a WebSocket client written out by hand so
//! that the frames are exactly the ones under test: an MQTT packet split over several frames
//! and several packets in one frame, subprotocol negotiation, a wrong path, text frames,
//! pings, slow upgrades, and what an idle WebSocket connection costs next to a TCP one.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use bytes::Bytes;
use mqttd_proto::codec::PacketReader;
use mqttd_proto::{
    Disconnect, Packet, PacketId, ProtocolVersion, PubResponse, Publish, PublishProperties, QoS,
    ReasonCode, TopicName,
};

use support::{connect_packet, encode, subscribe_packet, within, Broker, RawConn, Received};

/// A hang bound for every step.
const STEP: Duration = Duration::from_secs(30);

const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// What the broker answered an upgrade request with.
struct Answer {
    status: u16,
    /// Header lines, lower-cased names.
    headers: Vec<(String, String)>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A WebSocket client connection, framing by hand.
struct WsConn {
    stream: TcpStream,
    /// Bytes read and not yet parsed as frames.
    input: BytesMut,
    /// The MQTT stream the broker's binary frames carried, not yet decoded.
    mqtt: BytesMut,
    reader: PacketReader,
    /// The version to decode the broker's packets with.
    version: ProtocolVersion,
}

impl WsConn {
    /// Sends an upgrade request for `path` with `extra` header lines; the answer, and the
    /// connection if the broker switched protocols.
    async fn open(addr: SocketAddr, path: &str, extra: &str) -> (Answer, Option<Self>) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send the request");
        let mut input = BytesMut::new();
        let end = loop {
            if let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let n = within(STEP, "the upgrade answer", stream.read_buf(&mut input))
                .await
                .expect("read the answer");
            assert!(n > 0, "closed before answering: {input:?}");
        };
        let head = String::from_utf8(input.split_to(end).to_vec()).expect("ASCII answer");
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let answer = Answer { status, headers };
        let conn = (status == 101).then(|| Self {
            stream,
            input,
            mqtt: BytesMut::new(),
            reader: PacketReader::new(u32::MAX),
            version: ProtocolVersion::V5,
        });
        (answer, conn)
    }

    /// Opens an upgraded connection offering `mqtt`.
    async fn upgraded(addr: SocketAddr) -> Self {
        let (answer, conn) = Self::open(addr, "/mqtt", "Sec-WebSocket-Protocol: mqtt\r\n").await;
        assert_eq!(answer.status, 101);
        conn.expect("upgraded")
    }

    /// Sends one frame, masked as a client must.
    async fn frame(&mut self, opcode: u8, fin: bool, payload: &[u8]) {
        let bytes = client_frame(opcode, fin, payload);
        self.stream.write_all(&bytes).await.expect("send a frame");
    }

    /// The next frame from the broker: (fin, opcode, payload); `None` at the end of the
    /// stream.
    async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, len)) = parse_server_frame(&self.input) {
                let _ = self.input.split_to(len);
                return Some(frame);
            }
            match within(STEP, "a frame", self.stream.read_buf(&mut self.input)).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The next MQTT packet from the broker's binary frames; panics on anything else.
    async fn packet(&mut self) -> Packet {
        loop {
            if let Some(p) = self
                .reader
                .read(&mut self.mqtt, Some(self.version))
                .expect("decodable packets")
            {
                return p;
            }
            match self.next_frame().await {
                Some((true, BINARY, payload)) => self.mqtt.extend_from_slice(&payload),
                other => panic!("expected a binary frame, got {other:?}"),
            }
        }
    }
}

fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0x01, 0xc3, 0x7e];
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// A frame: (fin, opcode, payload).
type Frame = (bool, u8, Vec<u8>);

fn parse_server_frame(bytes: &[u8]) -> Option<(Frame, usize)> {
    let (&b0, &b1) = (bytes.first()?, bytes.get(1)?);
    assert_eq!(b1 & 0x80, 0, "the broker's frames are not masked");
    let (len, at) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = bytes.get(at..at + len)?.to_vec();
    Some(((b0 & 0x80 != 0, b0 & 0x0f, payload), at + len))
}

fn publish(topic: &str, payload: &[u8], qos: QoS, id: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: TopicName::try_from(topic).expect("valid topic"),
        packet_id: (qos != QoS::AtMostOnce).then(|| PacketId::new(id).expect("non-zero")),
        properties: PublishProperties::default(),
        payload: Bytes::copy_from_slice(payload),
    })
}

#[tokio::test]
async fn packets_span_frames_and_frames_hold_several_packets() {
    let broker = Broker::start("");
    let v5 = ProtocolVersion::V5;
    let mut ws = WsConn::upgraded(broker.ws).await;

    // CONNECT in three frames of one message: one byte, a few, the rest.
    let connect = encode(v5, &connect_packet(v5, "ws-frames"));
    ws.frame(BINARY, false, &connect[..1]).await;
    ws.frame(CONTINUATION, false, &connect[1..5]).await;
    ws.frame(CONTINUATION, true, &connect[5..]).await;
    match ws.packet().await {
        Packet::ConnAck(ack) => assert!(!ack.reason.is_error(), "{ack:?}"),
        other => panic!("expected CONNACK, got {other:?}"),
    }

    // SUBSCRIBE, a QoS 1 PUBLISH to that topic and a PINGREQ in one frame.
    let mut batch = encode(v5, &subscribe_packet(1, "ws/one", QoS::AtLeastOnce));
    batch.extend(encode(
        v5,
        &publish("ws/one", b"hello", QoS::AtLeastOnce, 2),
    ));
    batch.extend(encode(v5, &Packet::PingReq));
    ws.frame(BINARY, true, &batch).await;
    let (mut suback, mut puback, mut echoed, mut pingresp) = (0, 0, 0, 0);
    while suback + puback + echoed + pingresp < 4 {
        match ws.packet().await {
            Packet::SubAck(_) => suback += 1,
            Packet::PubAck(_) => puback += 1,
            Packet::Publish(p) => {
                assert_eq!(p.payload.as_ref(), b"hello");
                echoed += 1;
                if let Some(id) = p.packet_id {
                    let ack = Packet::PubAck(PubResponse::success(id));
                    ws.frame(BINARY, true, &encode(v5, &ack)).await;
                }
            }
            Packet::PingResp => pingresp += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((suback, puback, echoed, pingresp), (1, 1, 1, 1));

    // A PUBLISH of 300 KiB, one byte per frame for its header and the rest in frames of
    // 100 KiB, reaches a TCP subscriber whole.
    let mut tcp = RawConn::connected(broker.mqtt, v5, "tcp-sub").await;
    tcp.send(&encode(v5, &subscribe_packet(1, "ws/big", QoS::AtMostOnce)))
        .await
        .unwrap();
    assert!(matches!(tcp.recv(STEP).await, Received::Packet(p) if matches!(*p, Packet::SubAck(_))));
    let payload: Vec<u8> = (0..300 * 1024).map(|i| (i % 251) as u8).collect();
    let big = encode(v5, &publish("ws/big", &payload, QoS::AtMostOnce, 0));
    ws.frame(BINARY, false, &big[..1]).await;
    let mut chunks = big[1..].chunks(100 * 1024).peekable();
    while let Some(chunk) = chunks.next() {
        ws.frame(CONTINUATION, chunks.peek().is_none(), chunk).await;
    }
    match tcp.recv(STEP).await {
        Received::Packet(p) => match *p {
            Packet::Publish(p) => assert!(p.payload.as_ref() == payload.as_slice()),
            other => panic!("expected the big PUBLISH, got {other:?}"),
        },
        other => panic!("expected the big PUBLISH, got {other:?}"),
    }

    // A ping is answered with its payload; DISCONNECT then ends with a close frame.
    ws.frame(PING, true, b"are you there").await;
    let pong = ws.next_frame().await;
    assert_eq!(pong, Some((true, PONG, b"are you there".to_vec())));
    let disconnect = Packet::Disconnect(Disconnect::new(ReasonCode::Success));
    ws.frame(BINARY, true, &encode(v5, &disconnect)).await;
    let close = ws.next_frame().await.expect("a close frame");
    assert_eq!((close.0, close.1), (true, CLOSE));
    broker.stop();
}

#[tokio::test]
async fn subprotocols_paths_and_refusals() {
    let broker = Broker::start("");
    for (offer, expected) in [
        ("Sec-WebSocket-Protocol: mqtt\r\n", Some("mqtt")),
        ("Sec-WebSocket-Protocol: mqttv3.1\r\n", Some("mqttv3.1")),
        ("Sec-WebSocket-Protocol: chat, mqtt\r\n", Some("mqtt")),
        ("", None),
    ] {
        let (answer, conn) = WsConn::open(broker.ws, "/mqtt", offer).await;
        assert_eq!(answer.status, 101, "{offer:?}");
        assert_eq!(
            answer.header("sec-websocket-protocol"),
            expected,
            "{offer:?}"
        );
        assert_eq!(
            answer.header("sec-websocket-accept"),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        // The upgraded connection speaks MQTT, whatever was offered.
        let mut ws = conn.unwrap();
        let v4 = ProtocolVersion::V3_1_1;
        ws.version = v4;
        ws.frame(BINARY, true, &encode(v4, &connect_packet(v4, "negotiated")))
            .await;
        assert!(matches!(ws.packet().await, Packet::ConnAck(_)));
    }
    let (answer, conn) = WsConn::open(broker.ws, "/mqtt", "Sec-WebSocket-Protocol: chat\r\n").await;
    assert_eq!(answer.status, 400, "only unknown subprotocols offered");
    assert!(conn.is_none());
    let (answer, _) = WsConn::open(broker.ws, "/elsewhere", "").await;
    assert_eq!(answer.status, 404);
    // A plain HTTP request on the WebSocket listener.
    let mut plain = TcpStream::connect(broker.ws).await.unwrap();
    plain
        .write_all(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    within(STEP, "the 426", plain.read_to_string(&mut answer))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 426 "), "{answer}");
    broker.stop();
}

#[tokio::test]
async fn a_text_frame_closes_the_connection() {
    let broker = Broker::start("");
    let v5 = ProtocolVersion::V5;
    let mut ws = WsConn::upgraded(broker.ws).await;
    ws.frame(BINARY, true, &encode(v5, &connect_packet(v5, "texter")))
        .await;
    assert!(matches!(ws.packet().await, Packet::ConnAck(_)));
    ws.frame(TEXT, true, b"{\"publish\": 1}").await;
    // The broker may first send a DISCONNECT; then the close frame, 1003, and the end.
    let mut close = None;
    while let Some(frame) = ws.next_frame().await {
        if frame.1 == CLOSE {
            close = Some(frame.2);
        }
    }
    assert_eq!(close, Some(1003u16.to_be_bytes().to_vec()));
    broker.stop();
}

/// Sockets that send nothing, or trickle an upgrade request a byte at a time, are closed at
/// the CONNECT deadline, while a client that does its part is served throughout.
#[tokio::test]
async fn slow_upgrades_are_closed_at_the_connect_deadline() {
    let broker = Broker::start("connect_timeout = 1\n");
    const SILENT: usize = 500;
    const TRICKLING: usize = 100;
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(broker.ws).await.unwrap());
    }
    let trickling: Vec<_> = (0..TRICKLING)
        .map(|_| {
            let addr = broker.ws;
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let request = b"GET /mqtt HTTP/1.1\r\nHost: slow\r\nUpgrade: websocket\r\n";
                // One byte every 100 ms: 5 s for the request, far past the deadline. The
                // broker closing the socket ends the writes.
                for byte in request.iter().cycle().take(200) {
                    if s.write_all(&[*byte]).await.is_err() {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // Still open after 20 s: the deadline did not hold.
                let mut rest = Vec::new();
                matches!(
                    tokio::time::timeout(Duration::from_millis(1), s.read_to_end(&mut rest)).await,
                    Ok(Ok(_))
                )
            })
        })
        .collect();

    // A witness over WebSocket publishes to a TCP subscriber meanwhile.
    let v5 = ProtocolVersion::V5;
    let mut tcp = RawConn::connected(broker.mqtt, v5, "witness-sub").await;
    tcp.send(&encode(
        v5,
        &subscribe_packet(1, "witness", QoS::AtMostOnce),
    ))
    .await
    .unwrap();
    assert!(matches!(tcp.recv(STEP).await, Received::Packet(_)));
    let mut ws = WsConn::upgraded(broker.ws).await;
    ws.frame(BINARY, true, &encode(v5, &connect_packet(v5, "witness")))
        .await;
    assert!(matches!(ws.packet().await, Packet::ConnAck(_)));
    for i in 0..5u8 {
        ws.frame(
            BINARY,
            true,
            &encode(v5, &publish("witness", &[i], QoS::AtMostOnce, 0)),
        )
        .await;
        match tcp.recv(STEP).await {
            Received::Packet(p) => {
                assert!(matches!(*p, Packet::Publish(ref m) if m.payload.as_ref() == [i]))
            }
            other => panic!("witness message {i}: {other:?}"),
        }
    }

    let mut closed = 0;
    for mut s in silent {
        let mut buf = [0u8; 16];
        // The deadline is 1 s; the bound only catches a broker that never closes.
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, SILENT, "silent sockets closed");
    let mut cut = 0;
    for t in trickling {
        if t.await.unwrap() {
            cut += 1;
        }
    }
    assert_eq!(cut, TRICKLING, "trickling sockets closed");
    // The witness is still connected.
    ws.frame(BINARY, true, &encode(v5, &Packet::PingReq)).await;
    assert!(matches!(ws.packet().await, Packet::PingResp));
    broker.stop();
}

/// An idle connection over WebSocket costs at most a few KiB more than an idle TCP one: the
/// WebSocket layer keeps no buffers of its own between packets.
#[tokio::test]
async fn an_idle_websocket_connection_costs_a_few_kib_more_than_a_tcp_one() {
    const N: usize = 400;
    let broker = Broker::start("");
    let v4 = ProtocolVersion::V3_1_1;
    // Warm up: the runtime and allocator reach their working size.
    let mut warm_tcp = Vec::new();
    let mut warm_ws = Vec::new();
    for i in 0..50 {
        warm_tcp.push(RawConn::connected(broker.mqtt, v4, &format!("warm-{i}")).await);
        let mut ws = WsConn::upgraded(broker.ws).await;
        ws.version = v4;
        ws.frame(
            BINARY,
            true,
            &encode(v4, &connect_packet(v4, &format!("warm-ws-{i}"))),
        )
        .await;
        assert!(matches!(ws.packet().await, Packet::ConnAck(_)));
        warm_ws.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let base = broker.rss();
    let mut tcp = Vec::new();
    for i in 0..N {
        tcp.push(RawConn::connected(broker.mqtt, v4, &format!("tcp-{i}")).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let with_tcp = broker.rss();
    let mut ws_conns = Vec::new();
    for i in 0..N {
        let mut ws = WsConn::upgraded(broker.ws).await;
        ws.version = v4;
        ws.frame(
            BINARY,
            true,
            &encode(v4, &connect_packet(v4, &format!("ws-{i}"))),
        )
        .await;
        assert!(matches!(ws.packet().await, Packet::ConnAck(_)));
        ws_conns.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let with_ws = broker.rss();
    let per_tcp = with_tcp.saturating_sub(base) / N as u64;
    let per_ws = with_ws.saturating_sub(with_tcp) / N as u64;
    eprintln!("idle connection: tcp {per_tcp} B, ws {per_ws} B");
    // Measured (debug build): about 2.6 KiB over TCP, which parks in a compact form, and
    // 5.4 KiB over WebSocket, which keeps its task and boxed frame state. The bound is on the
    // difference, not a ratio: the smaller TCP gets, the tighter a ratio would be.
    const WS_EXTRA: u64 = 6 * 1024;
    assert!(per_tcp > 0, "{N} TCP connections cost nothing?");
    assert!(
        per_ws <= per_tcp + WS_EXTRA,
        "an idle WebSocket connection holds {per_ws} B, a TCP one {per_tcp} B"
    );
    drop((warm_tcp, warm_ws, tcp, ws_conns));
    broker.stop();
}

/// At shutdown an MQTT 5 client over WebSocket gets DISCONNECT 0x8B, then a close frame.
#[tokio::test]
async fn shutdown_sends_disconnect_then_a_close_frame() {
    let broker = Broker::start("");
    let v5 = ProtocolVersion::V5;
    let mut ws = WsConn::upgraded(broker.ws).await;
    ws.frame(
        BINARY,
        true,
        &encode(v5, &connect_packet(v5, "until-the-end")),
    )
    .await;
    assert!(matches!(ws.packet().await, Packet::ConnAck(_)));
    // Blocks until the broker has exited; what it sent waits in the socket.
    broker.stop();
    match ws.packet().await {
        Packet::Disconnect(d) => assert_eq!(d.reason, ReasonCode::ServerShuttingDown),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    let close = ws.next_frame().await.expect("a close frame");
    assert_eq!(close, (true, CLOSE, 1000u16.to_be_bytes().to_vec()));
    assert_eq!(ws.next_frame().await, None);
}
