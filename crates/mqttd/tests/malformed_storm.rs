//! A storm of malformed and abusive connections against the real broker, while a witness
//! publisher and subscriber exchange QoS 1 messages.
//!
//! Every connection of the storm breaks one rule the decoder or the connection state machine
//! enforces (one per `DecodeError` variant and then some), sends random bytes, trickles a
//! CONNECT byte by byte, or sends nothing at all. The test asserts what users of a broker on a
//! hostile network rely on:
//!
//! - each offending connection is closed by the broker: for a broken rule, because of the
//!   rule, and a connection that never completes its CONNECT by the connect timeout, counted
//!   from the connection's start; a malformed CONNECT is answered with a refusing CONNACK (in
//!   the client's protocol version) first, and an MQTT 5 client that breaks a rule later gets
//!   a DISCONNECT with the reason code the specification names;
//! - the broker process stays up, its memory bounded and its CPU time per offending connection
//!   small, and once the witness has left it holds no connection at all;
//! - the witness loses nothing and is not starved: every QoS 1 message is acknowledged with
//!   success and received exactly once, in order, and the storm lasts until the witness has
//!   exchanged [`WITNESS_DURING_STORM`] messages through it.
//!
//! Nothing here depends on how fast or how busy the machine is. To tell a close caused by a
//! broken rule from one by the connect timeout without timing either, the test runs two
//! brokers: the rule breakers go to one whose connect timeout is an hour, far beyond the
//! test's deadlines, so that only its handling of the rule can close them (and an established
//! connection that breaks a rule would otherwise live until its keep alive, 90 s); the
//! connections that never complete CONNECT (silence, slowloris, random bytes) go to one with a
//! connect timeout of 2 s. Each has its own witness. Every deadline is generous,
//! [`DEADLINE`], and only a hang or a broker that ignores what it must act on reaches it.
//!
//! The same rule cases run over TLS, WebSocket and QUIC too, one test per transport, each
//! offender on a connection of its own (a QUIC connection's first stream), under the shared
//! witness of the hostile-client tests ([`support::witness`]): each offender must be handled
//! as over TCP, the broker's memory stays within [`TRANSPORTS_RSS_MARGIN`], and the witness
//! loses nothing and keeps its p99 round trip under 20 ms (over QUIC reported, not asserted:
//! see that test).

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqttd_client::connect_tcp;
use mqttd_proto::client::{ClientConfig, Event};
use mqttd_proto::session::Enqueued;
use mqttd_proto::{
    ClientId, Message, Packet, ProtocolVersion, QoS, ReasonCode, TopicFilter, TopicName,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use support::{connect_packet, encode, varint, within, Broker, RawConn, Received};

use ProtocolVersion::{V3_1, V3_1_1, V5};

/// The rule breakers' broker's connect timeout, in seconds: longer than the test, so that
/// only the broker's handling of a broken rule can close a connection that broke one.
const PATIENT_CONNECT_TIMEOUT: u64 = 3600;
/// The other broker's connect timeout, in seconds: short, so that the connections that never
/// complete CONNECT end quickly.
const CONNECT_TIMEOUT: u64 = 2;
const MAX_PACKET_SIZE: u32 = 64 * 1024;

/// How long any offending connection may stay open after it was opened or sent its last byte.
/// The broker takes milliseconds for a broken rule and [`CONNECT_TIMEOUT`] for an incomplete
/// CONNECT; the bound is that of a hang. It is below what would close an offender the broker
/// ignored: the keep alive of 60 s (90 s with its grace) and [`PATIENT_CONNECT_TIMEOUT`].
const DEADLINE: Duration = Duration::from_secs(30);
/// The storm lasts at least this long, two rounds of every case, and until each witness has
/// exchanged [`WITNESS_DURING_STORM`] messages since it began.
const STORM: Duration = Duration::from_secs(4);
/// Messages each witness exchanges while the storm runs, at least: the storm keeps going until
/// they have (a witness the storm starved would hold it up until [`STORM_DEADLINE`]).
const WITNESS_DURING_STORM: u64 = 100;
/// Only a hang, or a witness the storm starves, takes this long.
const STORM_DEADLINE: Duration = Duration::from_secs(180);
/// Offending connections open at once.
const CONCURRENCY: usize = 48;
/// The broker's CPU time during the storm, at most, per offending connection and per witness
/// message (the witness runs throughout, so its share grows with the storm's length). A debug
/// build measures 0.07-0.15 ms per connection or witness message, idle or with both cores
/// busy, a sixth of the bound or less; a broker that spun on a half-closed connection, polled
/// idle ones, or re-parsed a trickled CONNECT from its start for every byte would spend many
/// times that.
const MAX_CPU_PER_CONNECTION: Duration = Duration::from_millis(1);
const MAX_CPU_PER_WITNESS_MESSAGE: Duration = Duration::from_millis(1);
/// Memory a broker may add over its baseline during the storm. 48 connections at a time with
/// 64 KiB read buffers at most hold 3 MiB; a broker that allocated what a packet declares, up
/// to 256 MiB, would exceed it.
const RSS_MARGIN: u64 = 64 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Byte builders
// ---------------------------------------------------------------------------------------------

/// A packet: first byte, remaining length, body.
fn frame(first_byte: u8, body: &[u8]) -> Vec<u8> {
    [&[first_byte][..], &varint(body.len()), body].concat()
}

/// A length-prefixed string or binary field.
fn s(data: &[u8]) -> Vec<u8> {
    [&(data.len() as u16).to_be_bytes()[..], data].concat()
}

/// CONNECT with the given protocol name, level and flags, keep alive 60, then `rest`.
fn connect(name: &str, level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    frame(
        0x10,
        &[&s(name.as_bytes()), &[level, flags, 0x00, 0x3C][..], rest].concat(),
    )
}

fn connect_v311(flags: u8, rest: &[u8]) -> Vec<u8> {
    connect("MQTT", 4, flags, rest)
}

/// An MQTT 5 CONNECT with `properties`, then `rest` (client identifier onwards).
fn connect_v5(flags: u8, properties: &[u8], rest: &[u8]) -> Vec<u8> {
    connect(
        "MQTT",
        5,
        flags,
        &[&[properties.len() as u8][..], properties, rest].concat(),
    )
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// What the broker must do with an offending connection.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Refuse the CONNECT with a CONNACK in `version`'s format, then close. `reason` is the
    /// exact code where the specification fixes it; `None` accepts any refusal.
    ConnAck(ProtocolVersion, Option<ReasonCode>),
    /// Send DISCONNECT with this reason (MQTT 5), then close.
    Disconnect(ReasonCode),
    /// Close without sending anything.
    Close,
    /// Either refuse with a CONNACK in this version's format, or close without one. Both are
    /// allowed [MQTT-4.13.1]; see the case that uses it.
    ConnAckOrClose(ProtocolVersion),
    /// Close; anything sent before is fine (the client half-closed first).
    CloseAny,
}

#[derive(Debug, Clone)]
struct Case {
    name: String,
    /// Complete a handshake in this version before sending `bytes`.
    after_connect: Option<ProtocolVersion>,
    bytes: Vec<u8>,
    /// Half-close the connection after sending.
    fin: bool,
    expect: Expect,
}

fn before(name: &str, bytes: Vec<u8>, expect: Expect) -> Case {
    Case {
        name: format!("before CONNECT: {name}"),
        after_connect: None,
        bytes,
        fin: false,
        expect,
    }
}

/// Rules checked on the CONNECT itself or before it.
fn connect_cases() -> Vec<Case> {
    use Expect::{Close, ConnAck};
    use ReasonCode::*;
    let cid = s(b"c");
    let valid_v5 = encode(V5, &connect_packet(V5, "c"));
    let mut connect_with_flags = valid_v5.clone();
    connect_with_flags[0] = 0x11;
    let will_v311 = [&cid[..], &s(b"w"), &s(b"bye")].concat();
    let mut cases = vec![
        before("packet type 0", vec![0x00, 0x00], Close),
        before("CONNECT with fixed header flags", connect_with_flags, Close),
        before(
            "five-byte remaining length",
            vec![0x10, 0x80, 0x80, 0x80, 0x80, 0x01],
            Close,
        ),
        before(
            "remaining length not in its shortest form",
            vec![0x10, 0x80, 0x00],
            Close,
        ),
        before(
            "largest declared length",
            vec![0x10, 0xFF, 0xFF, 0xFF, 0x7F],
            Close,
        ),
        before(
            "declared length one above max_packet_size",
            // 1 + 3 + (max - 3) bytes: one more than the limit, fixed header included.
            [&[0x10][..], &varint(MAX_PACKET_SIZE as usize - 3)].concat(),
            Close,
        ),
        before(
            "PUBLISH",
            frame(0x30, &[&s(b"t")[..], b"x"].concat()),
            Close,
        ),
        before(
            "SUBSCRIBE",
            frame(0x82, &[&[0x00, 0x01][..], &s(b"#"), &[0x00]].concat()),
            Close,
        ),
        before("PINGREQ", vec![0xC0, 0x00], Close),
        before("DISCONNECT", vec![0xE0, 0x00], Close),
        before(
            "protocol level 6",
            connect("MQTT", 6, 0x02, &cid),
            ConnAck(V3_1_1, Some(UnsupportedProtocolVersion)),
        ),
        before(
            "protocol level 3 named MQTT",
            connect("MQTT", 3, 0x02, &cid),
            ConnAck(V3_1_1, Some(UnsupportedProtocolVersion)),
        ),
        before(
            "protocol level 0",
            connect("MQTT", 0, 0x02, &cid),
            ConnAck(V3_1_1, Some(UnsupportedProtocolVersion)),
        ),
        before(
            "protocol name MQTX",
            connect("MQTX", 4, 0x02, &cid),
            ConnAck(V3_1_1, Some(UnsupportedProtocolVersion)),
        ),
        before(
            "reserved CONNECT flag, 3.1",
            connect("MQIsdp", 3, 0x03, &cid),
            ConnAck(V3_1, None),
        ),
        before(
            "reserved CONNECT flag, 3.1.1",
            connect_v311(0x03, &cid),
            ConnAck(V3_1_1, None),
        ),
        before(
            "reserved CONNECT flag, 5",
            connect_v5(0x01, &[], &cid),
            ConnAck(V5, Some(MalformedPacket)),
        ),
        before(
            "will QoS 3, 3.1.1",
            connect_v311(0x04 | 0x18, &will_v311),
            ConnAck(V3_1_1, None),
        ),
        before(
            "will QoS 3, 5",
            connect_v5(
                0x04 | 0x18,
                &[],
                &[&cid[..], &[0x00], &s(b"w"), &s(b"bye")].concat(),
            ),
            ConnAck(V5, Some(MalformedPacket)),
        ),
        before(
            "will retain without will",
            connect_v5(0x20, &[], &cid),
            ConnAck(V5, Some(MalformedPacket)),
        ),
        before(
            "wildcard in will topic",
            connect_v5(
                0x04,
                &[],
                &[&cid[..], &[0x00], &s(b"w/#"), &s(b"bye")].concat(),
            ),
            ConnAck(V5, Some(TopicNameInvalid)),
        ),
        before(
            "client identifier not UTF-8, 3.1.1",
            connect_v311(0x02, &s(&[0xC3, 0x28])),
            ConnAck(V3_1_1, Some(ClientIdentifierNotValid)),
        ),
        before(
            "client identifier not UTF-8, 5",
            connect_v5(0x02, &[], &s(&[0xC3, 0x28])),
            ConnAck(V5, Some(ClientIdentifierNotValid)),
        ),
        before(
            "U+0000 in client identifier",
            connect_v5(0x02, &[], &s(b"a\0b")),
            ConnAck(V5, Some(ClientIdentifierNotValid)),
        ),
        before(
            "empty client identifier without clean session, 3.1.1",
            connect_v311(0x00, &s(b"")),
            ConnAck(V3_1_1, Some(ClientIdentifierNotValid)),
        ),
        before(
            "password without user name, 3.1.1",
            connect_v311(0x42, &[&cid[..], &s(b"secret")].concat()),
            ConnAck(V3_1_1, None),
        ),
        before(
            "duplicate CONNECT property",
            connect_v5(0x02, &[0x11, 0, 0, 0, 10, 0x11, 0, 0, 0, 10], &cid),
            ConnAck(V5, Some(ProtocolError)),
        ),
        before(
            "unknown CONNECT property",
            connect_v5(0x02, &[0x7F, 0x00], &cid),
            ConnAck(V5, Some(MalformedPacket)),
        ),
        before(
            "receive maximum 0",
            connect_v5(0x02, &[0x21, 0x00, 0x00], &cid),
            ConnAck(V5, Some(ProtocolError)),
        ),
        before(
            "topic alias in CONNECT",
            connect_v5(0x02, &[0x23, 0x00, 0x01], &cid),
            ConnAck(V5, Some(ProtocolError)),
        ),
        before(
            "CONNECT ending after the protocol level",
            frame(0x10, &[&s(b"MQTT")[..], &[5]].concat()),
            ConnAck(V5, Some(MalformedPacket)),
        ),
        // The codec reports bytes after the last CONNECT field without the CONNECT's version
        // (`r.finish()` in `Packet::decode` is outside `InConnect`), so this malformed CONNECT,
        // unlike the others, is closed without a CONNACK. The specification allows both.
        before(
            "CONNECT with a trailing byte",
            connect_v311(0x02, &[&cid[..], &[0x00]].concat()),
            Expect::ConnAckOrClose(V3_1_1),
        ),
    ];
    // Truncated packets, then the client half-closes: the broker must not wait for the rest.
    for (name, bytes) in [
        ("truncated CONNECT", valid_v5[..valid_v5.len() - 3].to_vec()),
        ("CONNECT fixed header only", vec![0x10]),
        ("CONNECT half a remaining length", vec![0x10, 0x80]),
    ] {
        cases.push(Case {
            fin: true,
            expect: Expect::CloseAny,
            ..before(name, bytes, Close)
        });
    }
    cases
}

/// Rules checked after a successful handshake in `version`: MQTT 5 clients must get a
/// DISCONNECT with `reason` before the close, 3.1.1 clients just the close.
fn established_cases(version: ProtocolVersion) -> Vec<Case> {
    use ReasonCode::*;
    let v5 = version.is_v5();
    // The empty property length MQTT 5 packets carry.
    let p: &[u8] = if v5 { &[0x00] } else { &[] };
    let publish = |first: u8, topic: &[u8], id: &[u8], props: &[u8]| {
        let props = if v5 {
            [&varint(props.len())[..], props].concat()
        } else {
            Vec::new()
        };
        frame(first, &[&s(topic)[..], id, &props, b"payload"].concat())
    };
    let subscribe = |id: &[u8], filter: &[u8], options: u8| {
        frame(0x82, &[id, p, &s(filter), &[options]].concat())
    };
    let mut rules: Vec<(&str, Vec<u8>, ReasonCode)> = vec![
        ("packet type 0", vec![0x00, 0x00], MalformedPacket),
        (
            "PUBACK with flags",
            vec![0x41, 0x02, 0x00, 0x01],
            MalformedPacket,
        ),
        (
            "SUBSCRIBE without its flags",
            frame(0x80, &[&[0x00, 0x01], p, &s(b"a"), &[0x00]].concat()),
            MalformedPacket,
        ),
        ("PINGREQ with flags", vec![0xC1, 0x00], MalformedPacket),
        (
            "five-byte remaining length",
            vec![0x30, 0x80, 0x80, 0x80, 0x80, 0x01],
            MalformedPacket,
        ),
        (
            "remaining length not in its shortest form",
            vec![0xC0, 0x80, 0x00],
            MalformedPacket,
        ),
        (
            "declared length above max_packet_size",
            [&[0x30][..], &varint(100_000)].concat(),
            PacketTooLarge,
        ),
        (
            "largest declared length",
            vec![0x30, 0xFF, 0xFF, 0xFF, 0x7F],
            PacketTooLarge,
        ),
        (
            "topic not UTF-8",
            publish(0x30, &[0xFF], &[], &[]),
            MalformedPacket,
        ),
        (
            "U+0000 in topic",
            publish(0x30, b"a\0b", &[], &[]),
            MalformedPacket,
        ),
        (
            "wildcard in topic name",
            publish(0x30, b"a/+", &[], &[]),
            TopicNameInvalid,
        ),
        (
            "PUBLISH QoS 3",
            publish(0x36, b"t", &[0x00, 0x01], &[]),
            MalformedPacket,
        ),
        (
            "DUP on QoS 0",
            publish(0x38, b"t", &[], &[]),
            MalformedPacket,
        ),
        (
            "PUBLISH packet identifier 0",
            publish(0x32, b"t", &[0x00, 0x00], &[]),
            MalformedPacket,
        ),
        (
            "SUBSCRIBE packet identifier 0",
            subscribe(&[0x00, 0x00], b"a", 0x00),
            MalformedPacket,
        ),
        (
            "SUBSCRIBE without filters",
            frame(0x82, &[&[0x00, 0x01], p].concat()),
            ProtocolError,
        ),
        (
            "UNSUBSCRIBE without filters",
            frame(0xA2, &[&[0x00, 0x01], p].concat()),
            ProtocolError,
        ),
        (
            "subscription QoS 3",
            subscribe(&[0x00, 0x01], b"a", 0x03),
            MalformedPacket,
        ),
        (
            "misplaced wildcard in filter",
            subscribe(&[0x00, 0x01], b"a/#/b", 0x00),
            MalformedPacket,
        ),
        (
            "filter not UTF-8",
            subscribe(&[0x00, 0x01], &[0xC3, 0x28], 0x00),
            MalformedPacket,
        ),
        (
            "PINGREQ with a body",
            vec![0xC0, 0x01, 0x00],
            MalformedPacket,
        ),
        (
            "a second CONNECT",
            encode(version, &connect_packet(version, "again")),
            ProtocolError,
        ),
        (
            "CONNACK from a client",
            frame(0x20, &[&[0x00, 0x00], p].concat()),
            ProtocolError,
        ),
    ];
    if v5 {
        rules.extend([
            (
                "duplicate property",
                publish(0x30, b"t", &[], &[0x01, 0x01, 0x01, 0x01]),
                ProtocolError,
            ),
            (
                "unknown property",
                publish(0x30, b"t", &[], &[0x7F, 0x00]),
                MalformedPacket,
            ),
            (
                "property length past the end",
                vec![0x40, 0x04, 0x00, 0x01, 0x00, 0x0A],
                MalformedPacket,
            ),
            (
                "topic alias 0",
                publish(0x30, b"t", &[], &[0x23, 0x00, 0x00]),
                ProtocolError,
            ),
            (
                "empty topic without alias",
                publish(0x30, b"", &[], &[]),
                ProtocolError,
            ),
            (
                "subscription identifier from a client",
                publish(0x30, b"t", &[], &[0x0B, 0x01]),
                ProtocolError,
            ),
            (
                "retain handling 3",
                subscribe(&[0x00, 0x01], b"a", 0x30),
                ProtocolError,
            ),
            (
                "reserved subscription option bit",
                subscribe(&[0x00, 0x01], b"a", 0x40),
                MalformedPacket,
            ),
            (
                "AUTH with an invalid reason",
                vec![0xF0, 0x01, 0x01],
                MalformedPacket,
            ),
        ]);
    } else {
        rules.extend([
            ("AUTH in 3.1.1", vec![0xF0, 0x00], MalformedPacket),
            (
                "no-local option in 3.1.1",
                subscribe(&[0x00, 0x01], b"a", 0x04),
                MalformedPacket,
            ),
            ("empty topic", publish(0x30, b"", &[], &[]), MalformedPacket),
        ]);
    }
    let mut cases: Vec<Case> = rules
        .into_iter()
        .map(|(name, bytes, reason)| Case {
            name: format!("after {version} CONNECT: {name}"),
            after_connect: Some(version),
            bytes,
            fin: false,
            expect: if v5 {
                Expect::Disconnect(reason)
            } else {
                Expect::Close
            },
        })
        .collect();
    cases.push(Case {
        name: format!("after {version} CONNECT: truncated PUBLISH, then half-close"),
        after_connect: Some(version),
        bytes: vec![0x30, 0x10, 0x00, 0x05, b'a'],
        fin: true,
        expect: Expect::CloseAny,
    });
    cases
}

/// Runs one case on a connection of its own; `Err` says what the broker did wrong.
async fn run_case(addr: std::net::SocketAddr, case: &Case, n: usize) -> Result<(), String> {
    let mut conn = match case.after_connect {
        Some(v) => RawConn::connected(addr, v, &format!("storm-{n}")).await,
        None => {
            let version = match case.expect {
                Expect::ConnAck(v, _) | Expect::ConnAckOrClose(v) => v,
                _ => V5,
            };
            RawConn::open(addr, version).await
        }
    };
    // The broker may close while we are still writing; that is not an error.
    let _ = conn.send(&case.bytes).await;
    if case.fin {
        let _ = conn.stream.shutdown().await;
    }
    let sent = Instant::now();
    let packets = conn.until_closed(DEADLINE).await?;
    let took = sent.elapsed();
    let ok = match (case.expect, packets.as_slice()) {
        (Expect::CloseAny, _) | (Expect::Close | Expect::ConnAckOrClose(_), []) => true,
        (Expect::ConnAckOrClose(_), [Packet::ConnAck(ack)]) => ack.reason.is_error(),
        (Expect::ConnAck(_, reason), [Packet::ConnAck(ack)]) => {
            ack.reason.is_error() && reason.is_none_or(|r| ack.reason == r)
        }
        (Expect::Disconnect(reason), [Packet::Disconnect(d)]) => d.reason == reason,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected {:?}, got {packets:?} then close after {took:?}",
            case.expect
        ))
    }
}

/// A tiny deterministic generator, so that a failure with random bytes can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, max_len: usize) -> Vec<u8> {
        let len = 1 + (self.next() as usize) % max_len;
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Random bytes instead of a CONNECT. Some happen to look like the start of a CONNECT and wait
/// for more: the connect timeout must close those.
async fn garbage_before_connect(addr: std::net::SocketAddr, seed: u64) -> Result<(), String> {
    let bytes = XorShift(seed).bytes(512);
    let opened = Instant::now();
    let mut conn = RawConn::open(addr, V5).await;
    let _ = conn.send(&bytes).await;
    let packets = conn
        .until_closed(DEADLINE)
        .await
        .map_err(|e| format!("{bytes:02X?}: {e}"))?;
    match packets.as_slice() {
        [] => Ok(()),
        [Packet::ConnAck(ack)] if ack.reason.is_error() => Ok(()),
        _ => Err(format!(
            "{bytes:02X?}: got {packets:?} after {:?}",
            opened.elapsed()
        )),
    }
}

/// Random bytes after a handshake, then a half-close: whatever they decode to, the broker
/// must not hang on to the connection or fall over.
async fn garbage_after_connect(
    addr: std::net::SocketAddr,
    seed: u64,
    n: usize,
) -> Result<(), String> {
    let mut rng = XorShift(seed);
    let version = if rng.next().is_multiple_of(2) {
        V5
    } else {
        V3_1_1
    };
    let bytes = rng.bytes(512);
    let mut conn = RawConn::connected(addr, version, &format!("garbage-{n}")).await;
    let _ = conn.send(&bytes).await;
    let _ = conn.stream.shutdown().await;
    conn.until_closed(DEADLINE)
        .await
        .map(drop)
        .map_err(|e| format!("{version} {bytes:02X?}: {e}"))
}

/// Opens a connection and sends nothing.
async fn silent(addr: std::net::SocketAddr) -> Result<(), String> {
    let mut conn = RawConn::open(addr, V5).await;
    let packets = conn.until_closed(DEADLINE).await?;
    if packets.is_empty() {
        Ok(())
    } else {
        Err(format!("silent connection received {packets:?}"))
    }
}

/// Slowloris: a CONNECT one byte at a time. With `stall`, stops after half of it; otherwise
/// keeps trickling (a 400-byte client identifier at 10 bytes a second at most, for longer
/// than [`DEADLINE`]) so that only a deadline counted from the connection's start, not from
/// the last byte, can close it before the test's deadline.
async fn slowloris(addr: std::net::SocketAddr, stall: bool, n: usize) -> Result<(), String> {
    let client_id = format!("{n:0>400}");
    let bytes = encode(V5, &connect_packet(V5, &client_id));
    let bytes = if stall {
        &bytes[..bytes.len() / 2]
    } else {
        &bytes[..]
    };
    let opened = Instant::now();
    let mut conn = RawConn::open(addr, V5).await;
    for byte in bytes {
        if conn.send(&[*byte]).await.is_err() {
            break;
        }
        match conn.recv(Duration::from_millis(100)).await {
            Received::TimedOut => {}
            Received::Closed => break,
            other => return Err(format!("slowloris got {other:?}")),
        }
        if opened.elapsed() > DEADLINE {
            return Err(format!("slowloris still open after {:?}", opened.elapsed()));
        }
    }
    let left = DEADLINE.saturating_sub(opened.elapsed());
    let packets = conn
        .until_closed(left)
        .await
        .map_err(|e| format!("slowloris (stall {stall}): {e}"))?;
    if packets.is_empty() {
        Ok(())
    } else {
        Err(format!("slowloris received {packets:?}"))
    }
}

// ---------------------------------------------------------------------------------------------
// The witness
// ---------------------------------------------------------------------------------------------

const WITNESS_TOPIC: &str = "witness/seq";

/// What the witness saw.
struct Witness {
    /// Messages published and acknowledged with success.
    acknowledged: u64,
    /// Sequence numbers received, in order of arrival.
    received: Vec<u64>,
}

/// Publishes numbered QoS 1 messages one after the other, each acknowledged before the next,
/// until `stop`, counting them in `progress`; a subscriber receives them.
async fn witness(
    addr: std::net::SocketAddr,
    ready: tokio::sync::oneshot::Sender<()>,
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Witness {
    let config = |id: &str| ClientConfig::new(ClientId::try_from(id).expect("client id"));
    let (sub, mut sub_events, _) = connect_tcp(addr, config("witness-sub"), None)
        .await
        .expect("witness subscriber");
    let filter = TopicFilter::try_from(WITNESS_TOPIC).expect("filter");
    let ack = sub
        .subscribe_one(filter, QoS::AtLeastOnce)
        .await
        .expect("witness SUBACK");
    assert_eq!(ack.reasons, [ReasonCode::GrantedQoS1]);
    let receiver = tokio::spawn(async move {
        let mut received = Vec::new();
        while let Some(publish) = sub_events.next_message().await {
            let seq = u64::from_be_bytes(
                publish.message.payload[..]
                    .try_into()
                    .expect("8-byte payload"),
            );
            let last = seq == u64::MAX;
            received.push(seq);
            if last {
                break;
            }
        }
        let _ = sub.disconnect(ReasonCode::Success, None).await;
        received
    });
    let (publisher, mut pub_events, _) = connect_tcp(addr, config("witness-pub"), None)
        .await
        .expect("witness publisher");
    let topic = TopicName::try_from(WITNESS_TOPIC).expect("topic");
    let publish_one = |seq: u64| {
        let message = Message::new(
            topic.clone(),
            seq.to_be_bytes().to_vec(),
            QoS::AtLeastOnce,
            false,
        );
        let publisher = publisher.clone();
        async move {
            // One message at a time: it always goes out at once.
            let enqueued = publisher.publish(message).await.expect("witness publish");
            assert_eq!(enqueued, Enqueued::Sent, "witness message {seq}");
        }
    };
    let mut acknowledged = 0;
    let _ = ready.send(());
    while !stop.load(Ordering::Relaxed) {
        publish_one(acknowledged).await;
        loop {
            let event = tokio::time::timeout(DEADLINE, pub_events.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("witness message {acknowledged} not acknowledged within {DEADLINE:?}")
                })
                .expect("witness publisher connection closed");
            if let Event::Delivered { reason, .. } = event {
                assert_eq!(
                    reason,
                    ReasonCode::Success,
                    "PUBACK for witness message {acknowledged}"
                );
                break;
            }
        }
        acknowledged += 1;
        progress.store(acknowledged, Ordering::Relaxed);
    }
    // The end marker.
    publish_one(u64::MAX).await;
    let received = within(DEADLINE, "the witness's end marker", receiver)
        .await
        .expect("witness subscriber task");
    let _ = publisher.disconnect(ReasonCode::Success, None).await;
    Witness {
        acknowledged,
        received,
    }
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

/// A broker under storm, with its witness.
struct Target {
    broker: Broker,
    addr: std::net::SocketAddr,
    witness: JoinHandle<Witness>,
    /// Witness messages acknowledged so far.
    progress: Arc<AtomicU64>,
    /// Resident memory before the storm, and the most seen during it.
    baseline_rss: u64,
    peak_rss: u64,
    /// CPU time at the start of the storm.
    cpu_before: Duration,
    /// Offending connections sent to it.
    launched: usize,
}

impl Target {
    /// Starts a broker with `connect_timeout` and its witness, and waits until the witness
    /// is exchanging messages.
    async fn start(connect_timeout: u64, stop: &Arc<AtomicBool>) -> Self {
        let broker = Broker::start(&format!(
            "connect_timeout = {connect_timeout}\nmax_packet_size = {MAX_PACKET_SIZE}\n"
        ));
        let addr = broker.mqtt;
        let progress = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let witness = tokio::spawn(witness(addr, ready_tx, progress.clone(), stop.clone()));
        within(DEADLINE, "the witness's connections", ready_rx)
            .await
            .expect("witness ready");
        within(DEADLINE, "the witness's first messages", async {
            while progress.load(Ordering::Relaxed) < 10 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let baseline_rss = broker.rss();
        Self {
            addr,
            witness,
            progress,
            baseline_rss,
            peak_rss: baseline_rss,
            cpu_before: broker.cpu_time(),
            launched: 0,
            broker,
        }
    }

    fn sample(&mut self) {
        self.broker.assert_running();
        self.peak_rss = self.peak_rss.max(self.broker.rss());
    }

    /// After the storm: the witness lost nothing, memory and CPU time per offending connection
    /// stayed bounded, and no connection is left once the witness has gone.
    async fn check(mut self, name: &str, cpu: Duration, during_storm: u64) {
        let witness = within(Duration::from_secs(60), "the witness's end", self.witness)
            .await
            .expect("witness task");
        self.broker.assert_running();
        // The broker's work is the offending connections and the witness's messages.
        let work = self.launched as u64 + witness.acknowledged;
        let cpu_per_unit = cpu / work.max(1) as u32;
        eprintln!(
            "{name}: {} offending connections; witness: {} QoS 1 messages acknowledged and \
             received, {during_storm} during the storm; broker CPU {cpu:?} over the storm \
             ({cpu_per_unit:?} per connection or witness message), RSS {:.1} MiB before the \
             storm, peak {:.1} MiB",
            self.launched,
            witness.acknowledged,
            mib(self.baseline_rss),
            mib(self.peak_rss),
        );

        // The witness lost nothing: every acknowledged message arrived exactly once, in order,
        // then the end marker.
        let expected: Vec<u64> = (0..witness.acknowledged).chain([u64::MAX]).collect();
        assert!(
            witness.received == expected,
            "{name}: witness received {} messages for {} acknowledged; first difference at {:?}",
            witness.received.len() - 1,
            witness.acknowledged,
            witness
                .received
                .iter()
                .zip(&expected)
                .position(|(a, b)| a != b)
        );
        assert!(
            during_storm >= WITNESS_DURING_STORM,
            "{name}: the witness exchanged {during_storm} messages during the storm"
        );
        assert!(
            self.peak_rss <= self.baseline_rss + RSS_MARGIN,
            "{name}: broker RSS reached {:.1} MiB during the storm, more than {:.1} MiB over \
             its {:.1} MiB before",
            mib(self.peak_rss),
            mib(RSS_MARGIN),
            mib(self.baseline_rss)
        );
        let budget = MAX_CPU_PER_CONNECTION * self.launched as u32
            + MAX_CPU_PER_WITNESS_MESSAGE * witness.acknowledged as u32;
        assert!(
            cpu <= budget,
            "{name}: the broker spent {cpu:?} of CPU time on {} offending connections and {} \
             witness messages, {cpu_per_unit:?} each; at most {MAX_CPU_PER_CONNECTION:?} per \
             connection and {MAX_CPU_PER_WITNESS_MESSAGE:?} per witness message, {budget:?}",
            self.launched,
            witness.acknowledged
        );

        // The broker closed its side of every offending connection too: none is left open once
        // the witness has disconnected.
        let metrics = self
            .broker
            .wait_for_metrics(DEADLINE, |m| m.get("mqttd_connections_open") == 0.0)
            .await;
        assert_eq!(
            metrics.get("mqttd_connections_open"),
            0.0,
            "{name}: connections open after the storm"
        );
        assert!(metrics.get("mqttd_protocol_errors_total") > 0.0);
        self.broker.stop();
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_storm_closes_offenders_and_spares_the_witness() {
    let stop = Arc::new(AtomicBool::new(false));
    // Rule breakers: only the broker's handling of the rule can close them.
    let mut rules = Target::start(PATIENT_CONNECT_TIMEOUT, &stop).await;
    // Connections that never complete CONNECT: the connect timeout closes them.
    let mut slow = Target::start(CONNECT_TIMEOUT, &stop).await;
    let (rules_addr, slow_addr) = (rules.addr, slow.addr);

    let mut cases = connect_cases();
    cases.extend(established_cases(V5));
    cases.extend(established_cases(V3_1_1));
    let cases = Arc::new(cases);

    let storm_start = Instant::now();
    let witnessed_before = [
        rules.progress.load(Ordering::Relaxed),
        slow.progress.load(Ordering::Relaxed),
    ];
    let witnessed = |rules: &Target, slow: &Target| {
        [
            rules.progress.load(Ordering::Relaxed) - witnessed_before[0],
            slow.progress.load(Ordering::Relaxed) - witnessed_before[1],
        ]
    };
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut jobs: JoinSet<(String, Result<(), String>)> = JoinSet::new();
    // The slow ones first: they hold their connections through the storm's start.
    for n in 0..40 {
        jobs.spawn(async move { ("silent".to_owned(), silent(slow_addr).await) });
        if n < 10 {
            jobs.spawn(async move {
                (
                    "slowloris, stalled".to_owned(),
                    slowloris(slow_addr, true, n).await,
                )
            });
            jobs.spawn(async move {
                (
                    "slowloris, trickling".to_owned(),
                    slowloris(slow_addr, false, n).await,
                )
            });
        }
    }
    slow.launched = jobs.len();
    let mut launched = jobs.len();
    let mut round = 0;
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    while round < 2
        || storm_start.elapsed() < STORM
        || witnessed(&rules, &slow).into_iter().min() < Some(WITNESS_DURING_STORM)
    {
        assert!(
            storm_start.elapsed() < STORM_DEADLINE,
            "the witnesses exchanged {:?} messages (rule breakers' broker, connect-timeout \
             broker) in {STORM_DEADLINE:?} of storm",
            witnessed(&rules, &slow)
        );
        for (i, _) in cases.iter().enumerate() {
            let permit = permits.clone().acquire_owned().await.expect("semaphore");
            let cases = cases.clone();
            let n = launched;
            jobs.spawn(async move {
                let case = &cases[i];
                let result = run_case(rules_addr, case, n).await;
                drop(permit);
                (case.name.clone(), result)
            });
            launched += 1;
            rules.launched += 1;
        }
        for _ in 0..40 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let permit = permits.clone().acquire_owned().await.expect("semaphore");
            let (n, s) = (launched, seed);
            if n % 2 == 0 {
                slow.launched += 1;
            } else {
                rules.launched += 1;
            }
            jobs.spawn(async move {
                let result = if n % 2 == 0 {
                    garbage_before_connect(slow_addr, s).await
                } else {
                    garbage_after_connect(rules_addr, s, n).await
                };
                drop(permit);
                (format!("random bytes (seed {s:#x})"), result)
            });
            launched += 1;
        }
        round += 1;
        rules.sample();
        slow.sample();
    }
    // Each connection has deadlines of its own; this one only catches a helper that hangs.
    let failures = within(Duration::from_secs(120), "the storm's connections", async {
        let mut failures = Vec::new();
        while let Some(joined) = jobs.join_next().await {
            let (name, result) = joined.expect("storm task");
            if let Err(e) = result {
                failures.push(format!("{name}: {e}"));
            }
        }
        failures
    })
    .await;
    let storm = storm_start.elapsed();
    rules.sample();
    slow.sample();
    let cpu = [
        rules.broker.cpu_time() - rules.cpu_before,
        slow.broker.cpu_time() - slow.cpu_before,
    ];
    let during = witnessed(&rules, &slow);
    stop.store(true, Ordering::Relaxed);

    eprintln!(
        "storm: {launched} offending connections ({round} rounds of {} rule cases) in {storm:.1?}",
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {launched} offending connections were not handled as required:\n{}",
        failures.len(),
        failures.join("\n")
    );
    rules
        .check("rule breakers' broker", cpu[0], during[0])
        .await;
    slow.check("connect-timeout broker", cpu[1], during[1])
        .await;
}

// ---------------------------------------------------------------------------------------------
// The same rule cases over TLS, WebSocket and QUIC
// ---------------------------------------------------------------------------------------------

/// Memory the broker may add while the rule cases run over TLS, WebSocket and QUIC, 16
/// connections at a time. Measured on a debug build: see the test's output.
const TRANSPORTS_RSS_MARGIN: u64 = 32 * 1024 * 1024;
/// Rule cases in flight at once over the other transports.
const TRANSPORTS_CONCURRENCY: usize = 4;
/// The largest WebSocket frame the cases' bytes go out in: the cases test MQTT's limits, not
/// the WebSocket layer's.
const WS_FRAME: usize = 16 * 1024;

/// The transports besides TCP the rule cases run over.
#[derive(Clone, Copy, Debug)]
enum Over {
    Tls,
    WebSocket,
    Quic,
}

/// A byte stream of any transport.
trait Duplex: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Duplex for T {}

/// Where and how the cases reach the broker over each transport.
#[derive(Clone)]
struct Transports {
    tls: std::net::SocketAddr,
    ws: std::net::SocketAddr,
    quic: std::net::SocketAddr,
    tls_config: Arc<rustls::ClientConfig>,
    quic_endpoint: noq::Endpoint,
}

impl Transports {
    /// Reaches `broker`'s TLS, WebSocket and QUIC listeners, trusting its generated CA.
    fn of(broker: &Broker) -> Self {
        use rustls::pki_types::pem::PemObject;
        let ca = std::fs::read(broker.data_dir().join("tls").join("ca.pem")).expect("CA");
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
            roots.add(cert.expect("CA PEM")).expect("add CA");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut quic_tls = tls.clone();
        quic_tls.alpn_protocols = vec![b"mqtt".to_vec()];
        let crypto =
            noq::crypto::rustls::QuicClientConfig::try_from(quic_tls).expect("QUIC config");
        let endpoint =
            noq::Endpoint::client("127.0.0.1:0".parse().expect("address")).expect("UDP socket");
        endpoint.set_default_client_config(noq::ClientConfig::new(Arc::new(crypto)));
        Self {
            tls: broker.tls,
            ws: broker.ws,
            quic: broker.quic,
            tls_config: Arc::new(tls),
            quic_endpoint: endpoint,
        }
    }
}

/// A raw MQTT connection over TLS, WebSocket (binary frames) or QUIC (its first stream).
struct Wire {
    stream: Box<dyn Duplex>,
    /// Whether bytes go in WebSocket frames.
    ws: bool,
    /// WebSocket bytes read but not yet deframed.
    raw: bytes::BytesMut,
    /// MQTT bytes read but not yet decoded.
    rbuf: bytes::BytesMut,
    reader: mqttd_proto::codec::PacketReader,
    version: ProtocolVersion,
    /// Whether the broker closed (end of stream, a reset, a WebSocket close frame).
    closed: bool,
    /// Keeps a QUIC connection open while its stream is used.
    _quic: Option<noq::Connection>,
}

impl Wire {
    /// Opens a connection over `over`, its handshake done; no MQTT sent.
    async fn open(to: &Transports, over: Over, version: ProtocolVersion) -> Self {
        let (stream, ws, quic): (Box<dyn Duplex>, bool, _) = match over {
            Over::Tls => {
                let tcp = tokio::net::TcpStream::connect(to.tls)
                    .await
                    .expect("connect");
                let tls = tokio_rustls::TlsConnector::from(to.tls_config.clone())
                    .connect(
                        rustls::pki_types::ServerName::try_from("localhost").expect("name"),
                        tcp,
                    )
                    .await
                    .expect("TLS handshake");
                (Box::new(tls), false, None)
            }
            Over::WebSocket => {
                let mut tcp = tokio::net::TcpStream::connect(to.ws)
                    .await
                    .expect("connect");
                ws_upgrade(&mut tcp).await;
                (Box::new(tcp), true, None)
            }
            Over::Quic => {
                let conn = within(
                    DEADLINE,
                    "QUIC handshake",
                    to.quic_endpoint
                        .connect(to.quic, "localhost")
                        .expect("QUIC connect"),
                )
                .await
                .expect("QUIC handshake");
                let (send, recv) = conn.open_bi().await.expect("a stream");
                (Box::new(tokio::io::join(recv, send)), false, Some(conn))
            }
        };
        Self {
            stream,
            ws,
            raw: bytes::BytesMut::new(),
            rbuf: bytes::BytesMut::new(),
            reader: mqttd_proto::codec::PacketReader::new(u32::MAX),
            version,
            closed: false,
            _quic: quic,
        }
    }

    /// Opens a connection and completes an MQTT handshake in `version`.
    async fn connected(to: &Transports, over: Over, version: ProtocolVersion, id: &str) -> Self {
        let mut wire = Self::open(to, over, version).await;
        wire.send(&encode(version, &connect_packet(version, id)))
            .await
            .expect("CONNECT");
        match wire.next(DEADLINE).await {
            Ok(Some(Packet::ConnAck(ack))) if !ack.reason.is_error() => wire,
            other => panic!("{id} over {over:?}: expected a successful CONNACK, got {other:?}"),
        }
    }

    /// Sends `bytes` (in WebSocket frames of at most [`WS_FRAME`]); an error once the broker
    /// has closed.
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        if self.ws {
            for chunk in bytes.chunks(WS_FRAME) {
                self.stream.write_all(&ws_frame(chunk)).await?;
            }
        } else {
            self.stream.write_all(bytes).await?;
        }
        self.stream.flush().await
    }

    /// The next packet; `Ok(None)` once the broker has closed; `Err` if nothing came within
    /// `timeout` or the bytes do not decode.
    async fn next(&mut self, timeout: Duration) -> Result<Option<Packet>, String> {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.reader.read(&mut self.rbuf, Some(self.version)) {
                Ok(Some(packet)) => return Ok(Some(packet)),
                Ok(None) if self.closed => return Ok(None),
                Ok(None) => {}
                Err(e) => return Err(format!("undecodable bytes from the broker: {e}")),
            }
            let read = self.stream.read_buf(&mut self.raw);
            match tokio::time::timeout_at(deadline, read).await {
                Err(_) => return Err(format!("still open after {timeout:?}")),
                Ok(Ok(0) | Err(_)) => self.closed = true,
                Ok(Ok(_)) => {}
            }
            if self.ws {
                self.closed |= ws_deframe(&mut self.raw, &mut self.rbuf)?;
            } else {
                self.rbuf.extend_from_slice(&self.raw.split());
            }
        }
    }

    /// The packets the broker sends until it closes, within `timeout`.
    async fn until_closed(&mut self, timeout: Duration) -> Result<Vec<Packet>, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut packets = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Ok(Some(packet)) => packets.push(packet),
                Ok(None) => return Ok(packets),
                Err(e) => return Err(format!("{e}; received {packets:?}")),
            }
        }
    }
}

/// Upgrades `stream` to MQTT over WebSocket.
async fn ws_upgrade(stream: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(
            b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n",
        )
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

/// A masked binary WebSocket frame carrying `payload`, as a client sends.
fn ws_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x5A, 0x17, 0xC3, 0x08];
    let mut frame = vec![0x82];
    match payload.len() {
        n @ 0..=125 => frame.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Moves the payloads of the complete server frames in `raw` to `mqtt`; whether a close
/// frame came.
fn ws_deframe(raw: &mut bytes::BytesMut, mqtt: &mut bytes::BytesMut) -> Result<bool, String> {
    loop {
        let Some(&[first, second]) = raw.get(..2) else {
            return Ok(false);
        };
        if second & 0x80 != 0 {
            return Err("a masked frame from the server".to_owned());
        }
        let (len, header) = match second & 0x7F {
            126 => match raw.get(2..4) {
                Some(b) => (u16::from_be_bytes([b[0], b[1]]) as usize, 4),
                None => return Ok(false),
            },
            127 => match raw.get(2..10) {
                Some(b) => (
                    u64::from_be_bytes(b.try_into().expect("8 bytes")) as usize,
                    10,
                ),
                None => return Ok(false),
            },
            n => (n as usize, 2),
        };
        if raw.len() < header + len {
            return Ok(false);
        }
        let frame = raw.split_to(header + len);
        match first & 0x0F {
            // Binary and continuation frames carry MQTT.
            0x0 | 0x2 => mqtt.extend_from_slice(&frame[header..]),
            0x8 => return Ok(true),
            // Pings and pongs.
            _ => {}
        }
    }
}

/// Runs one rule case over `over`, as [`run_case`] does over TCP.
async fn run_case_over(to: &Transports, over: Over, case: &Case, n: usize) -> Result<(), String> {
    let mut wire = match case.after_connect {
        Some(v) => Wire::connected(to, over, v, &format!("storm-{n}")).await,
        None => {
            let version = match case.expect {
                Expect::ConnAck(v, _) | Expect::ConnAckOrClose(v) => v,
                _ => V5,
            };
            Wire::open(to, over, version).await
        }
    };
    let _ = wire.send(&case.bytes).await;
    if case.fin {
        let _ = wire.stream.shutdown().await;
    }
    let packets = wire.until_closed(DEADLINE).await?;
    let ok = match (case.expect, packets.as_slice()) {
        (Expect::CloseAny, _) | (Expect::Close | Expect::ConnAckOrClose(_), []) => true,
        (Expect::ConnAckOrClose(_), [Packet::ConnAck(ack)]) => ack.reason.is_error(),
        (Expect::ConnAck(_, reason), [Packet::ConnAck(ack)]) => {
            ack.reason.is_error() && reason.is_none_or(|r| ack.reason == r)
        }
        (Expect::Disconnect(reason), [Packet::Disconnect(d)]) => d.reason == reason,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("expected {:?}, got {packets:?}", case.expect))
    }
}

/// Every rule case over `over`, each on a connection of its own, while the shared witness
/// ([`support::witness`]) times its QoS 1 round trips over TCP: each offender is handled as
/// over TCP, the broker's memory stays within [`TRANSPORTS_RSS_MARGIN`], the witness loses
/// nothing, and (if `p99_asserted`) its p99 round trip stays under 20 ms.
async fn malformed_input_over(over: Over, p99_asserted: bool) {
    let listener = match over {
        Over::Quic => "quic://127.0.0.1:0",
        // The WebSocket listener is always there; the generated CA comes with the TLS one.
        Over::Tls | Over::WebSocket => "tls://127.0.0.1:0",
    };
    let broker = Broker::start_with(
        &format!(
            "connect_timeout = {PATIENT_CONNECT_TIMEOUT}\nmax_packet_size = {MAX_PACKET_SIZE}\n\
             persistence = false\nsys_interval = 0\n"
        ),
        &[listener],
    );
    let to = Transports::of(&broker);
    let mut cases = connect_cases();
    cases.extend(established_cases(V5));
    cases.extend(established_cases(V3_1_1));
    let cases = Arc::new(cases);
    let name = format!("malformed input over {over:?}");
    let bounds = support::witness::Bounds {
        rss_margin: TRANSPORTS_RSS_MARGIN,
        p99_asserted,
    };
    let passes = support::witness::under_witness_within(&broker, &name, bounds, || {
        let (to, cases) = (to.clone(), cases.clone());
        async move {
            let permits = Arc::new(Semaphore::new(TRANSPORTS_CONCURRENCY));
            let mut jobs = JoinSet::new();
            for i in 0..cases.len() {
                let permit = permits.clone().acquire_owned().await.expect("semaphore");
                let (to, cases) = (to.clone(), cases.clone());
                jobs.spawn(async move {
                    let result = run_case_over(&to, over, &cases[i], i).await;
                    drop(permit);
                    result.map_err(|e| format!("{}: {e}", cases[i].name))
                });
            }
            let mut failures = Vec::new();
            let mut ran = 0;
            while let Some(joined) = jobs.join_next().await {
                ran += 1;
                if let Err(e) = joined.expect("case task") {
                    failures.push(e);
                }
            }
            (ran, failures)
        }
    })
    .await;
    eprintln!(
        "{name}: {} passes of {} cases, {TRANSPORTS_CONCURRENCY} at a time",
        passes.len(),
        cases.len()
    );
    for (ran, failures) in &passes {
        assert!(
            failures.is_empty(),
            "{name}: {} of {ran} offending connections were not handled as required:\n{}",
            failures.len(),
            failures.join("\n")
        );
        assert_eq!(*ran, cases.len());
    }
    // Every offender's connection is gone, and the witness's.
    let metrics = broker
        .wait_for_metrics(DEADLINE, |m| m.get("mqttd_connections_open") == 0.0)
        .await;
    assert_eq!(metrics.get("mqttd_connections_open"), 0.0, "{name}");
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_over_tls_closes_offenders_and_spares_the_witness() {
    malformed_input_over(Over::Tls, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_over_websocket_closes_offenders_and_spares_the_witness() {
    malformed_input_over(Over::WebSocket, true).await;
}

/// The witness's p99 is reported, not asserted: on the 2-core machine, debug build, it is
/// 9-23 ms while the QUIC offenders' handshakes run with the machine at a load of 6-12, and
/// 50-100 ms at a load of 15 (0.4-1.4 ms alone, just before); see docs/architecture.md.
/// Counts, memory and the witness's messages are asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_over_quic_closes_offenders_and_spares_the_witness() {
    malformed_input_over(Over::Quic, false).await;
}
