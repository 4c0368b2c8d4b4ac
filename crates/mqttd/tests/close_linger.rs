//! A client that is still writing when the broker ends its connection reads why.
//!
//! When the broker closes a socket whose receive buffer still holds unread bytes, the kernel
//! answers with a reset instead of an orderly close, and a reset makes the client's pending
//! writes fail (a broken pipe) and may discard what it had not read yet: the DISCONNECT or
//! refusing CONNACK that says why. Paho's `test_flow_control2` is such a client. Here raw
//! clients write a burst far larger than the socket buffers (so that they are still writing
//! when the broker gives up on them) and must, every time, finish writing without error and
//! then read the broker's answer and an orderly close. Each case runs many times, since
//! without the fix the reset races with the client's reads.

mod support;

use std::time::Duration;

use mqttd_proto::{Packet, ProtocolVersion, ReasonCode};
use tokio::io::AsyncWriteExt;

use support::{varint, Broker, RawConn};

/// Rounds of each case.
const ROUNDS: usize = 50;
/// Bytes the client writes after the offending packet: more than the loopback socket buffers
/// hold, so the client is still writing when the broker decides.
const BURST: usize = 4 * 1024 * 1024;
/// Generous: only a hang reaches it.
const WAIT: Duration = Duration::from_secs(30);

const CONFIG: &str = "persistence = false\nreceive_maximum = 10\nmax_packet_size = 4096\n";

/// An MQTT 5 QoS 2 PUBLISH to `t` with no properties and a 16-byte payload.
fn publish_qos2(packet_id: u16) -> Vec<u8> {
    let mut body = vec![0, 1, b't'];
    body.extend_from_slice(&packet_id.to_be_bytes());
    body.push(0);
    body.extend_from_slice(&[b'x'; 16]);
    [&[0x34][..], &varint(body.len()), &body].concat()
}

/// QoS 2 PUBLISH packets with distinct identifiers, `BURST` bytes or a little more.
fn qos2_burst() -> Vec<u8> {
    let mut out = Vec::with_capacity(BURST + 64);
    let mut id = 1u16;
    while out.len() < BURST {
        out.extend(publish_qos2(id));
        id = id.checked_add(1).unwrap_or(1);
    }
    out
}

/// Writes `burst` in one go, then reads until the broker closes; returns the packets read.
/// A failed write is what Paho reported as a broken pipe: the test fails on it.
async fn write_then_read(conn: &mut RawConn, burst: &[u8], round: usize) -> Vec<Packet> {
    if let Err(error) = tokio::time::timeout(WAIT, conn.stream.write_all(burst))
        .await
        .expect("the broker keeps reading (or discarding) until the burst is written")
    {
        panic!("round {round}: writing failed ({error}): the broker reset the connection");
    }
    match conn.until_closed(WAIT).await {
        Ok(packets) => packets,
        Err(what) => panic!("round {round}: {what}"),
    }
}

#[tokio::test]
async fn client_writing_past_receive_maximum_reads_disconnect_0x93() {
    let broker = Broker::start(CONFIG);
    let burst = qos2_burst();
    for round in 0..ROUNDS {
        let mut conn = RawConn::connected(broker.mqtt, ProtocolVersion::V5, "flood").await;
        let packets = write_then_read(&mut conn, &burst, round).await;
        let reasons: Vec<_> = packets
            .iter()
            .filter_map(|p| match p {
                Packet::Disconnect(d) => Some(d.reason),
                _ => None,
            })
            .collect();
        assert_eq!(
            reasons,
            [ReasonCode::ReceiveMaximumExceeded],
            "round {round}: one DISCONNECT 0x93 before the close"
        );
    }
    broker.stop();
}

#[tokio::test]
async fn client_sending_an_oversized_packet_reads_disconnect_0x95() {
    let broker = Broker::start(CONFIG);
    // A PUBLISH announcing 64 KiB against a 4 KiB limit, then the rest of the burst.
    let mut burst = [&[0x30][..], &varint(64 * 1024)].concat();
    burst.resize(BURST, b'x');
    for round in 0..ROUNDS {
        let mut conn = RawConn::connected(broker.mqtt, ProtocolVersion::V5, "oversized").await;
        let packets = write_then_read(&mut conn, &burst, round).await;
        assert!(
            matches!(
                &packets[..],
                [Packet::Disconnect(d)] if d.reason == ReasonCode::PacketTooLarge
            ),
            "round {round}: expected DISCONNECT 0x95, got {packets:?}"
        );
    }
    broker.stop();
}

#[tokio::test]
async fn client_writing_after_a_refused_connect_reads_the_connack() {
    let broker = Broker::start(CONFIG);
    // MQTT level 6, refused with the 3.1.1 CONNACK 0x01, followed by more bytes.
    let mut burst = vec![
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 6, 0x02, 0, 60, 0, 1, b'c',
    ];
    burst.resize(BURST, 0);
    for round in 0..ROUNDS {
        let mut conn = RawConn::open(broker.mqtt, ProtocolVersion::V3_1_1).await;
        let packets = write_then_read(&mut conn, &burst, round).await;
        assert!(
            matches!(
                &packets[..],
                [Packet::ConnAck(ack)] if ack.reason == ReasonCode::UnsupportedProtocolVersion
            ),
            "round {round}: expected CONNACK 0x01, got {packets:?}"
        );
    }
    broker.stop();
}

/// The connections the tests above leave behind do not outlive them: once each client has
/// read the close and closed its end, the broker holds nothing.
#[tokio::test]
async fn lingering_connections_end_when_the_client_closes() {
    let broker = Broker::start(CONFIG);
    let burst = qos2_burst();
    for round in 0..3 {
        let mut conn = RawConn::connected(broker.mqtt, ProtocolVersion::V5, "flood").await;
        write_then_read(&mut conn, &burst, round).await;
    }
    let metrics = broker
        .wait_for_metrics(WAIT, |m| m.get("mqttd_connections_open") == 0.0)
        .await;
    assert_eq!(metrics.get("mqttd_connections_open"), 0.0);
    broker.stop();
}
