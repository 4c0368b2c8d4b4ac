//! A subscription that matches many retained messages gets every one of them, at the pace its
//! client reads, and the broker does not copy them all into the connection's output at once.
//!
//! 50,000 retained messages, half QoS 0 and half QoS 1, are stored; then a client subscribes
//! to all of them at QoS 1 and does not read for two seconds. Meanwhile the broker's resident
//! memory may grow by at most [`HELD_MARGIN`] (the messages are about 11 MiB encoded). Then the
//! client reads and acknowledges: every message arrives once, with its QoS and the retain
//! flag, before a live message published after the subscription (the fence that proves
//! nothing more is coming).

mod support;

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use mqttd_proto::codec::PacketReader;
use mqttd_proto::{Packet, ProtocolVersion, PubResponse, QoS};

use support::{encode, publish_packet, subscribe_packet, Broker, RawConn, Received};

const MESSAGES: usize = 50_000;
const PAYLOAD: usize = 200;
/// How much the broker may hold for a subscriber that does not read.
const HELD_MARGIN: u64 = 3 * 1024 * 1024;
const WAIT: Duration = Duration::from_secs(60);
const VERSION: ProtocolVersion = ProtocolVersion::V5;

fn qos_of(i: usize) -> QoS {
    if i.is_multiple_of(2) {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// Publishes the retained messages and waits for the broker to acknowledge every QoS 1 one.
async fn store_retained(addr: std::net::SocketAddr) {
    let conn = RawConn::connected(addr, VERSION, "retainer").await;
    let (stream, _) = conn.into_parts();
    let (mut rd, mut wr) = stream.into_split();
    let expected = (0..MESSAGES)
        .filter(|&i| qos_of(i) != QoS::AtMostOnce)
        .count();
    let acks = tokio::spawn(async move {
        let mut reader = PacketReader::new(u32::MAX);
        let mut buf = bytes::BytesMut::new();
        let mut acks = 0;
        while acks < expected {
            match reader.read(&mut buf, Some(VERSION)) {
                Ok(Some(Packet::PubAck(_))) => acks += 1,
                Ok(Some(other)) => panic!("publisher got {other:?}"),
                Ok(None) => {
                    let n = tokio::time::timeout(WAIT, rd.read_buf(&mut buf))
                        .await
                        .expect("PUBACKs in time")
                        .expect("read PUBACKs");
                    assert!(
                        n > 0,
                        "the broker closed the publisher after {acks} PUBACKs"
                    );
                }
                Err(e) => panic!("undecodable: {e}"),
            }
        }
    });
    let mut batch = Vec::new();
    for i in 0..MESSAGES {
        let mut payload = format!("{i:06}").into_bytes();
        payload.resize(PAYLOAD, b'.');
        let id = (i / 2 % 60_000 + 1) as u16;
        let packet = publish_packet(&format!("flood/{i}"), payload, qos_of(i), true, id);
        batch.extend(encode(VERSION, &packet));
        if batch.len() > 64 * 1024 || i + 1 == MESSAGES {
            wr.write_all(&batch).await.expect("publish");
            batch.clear();
        }
    }
    acks.await.expect("PUBACK reader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reader_gets_every_retained_message_and_the_broker_holds_little_meanwhile() {
    let broker = Broker::start("persistence = false\nreceive_maximum = 65535\n");
    let addr = broker.mqtt;
    store_retained(addr).await;
    let before = broker.rss();

    let mut sub = RawConn::connected(addr, VERSION, "late-reader").await;
    sub.send(&encode(
        VERSION,
        &subscribe_packet(1, "flood/#", QoS::AtLeastOnce),
    ))
    .await
    .expect("send SUBSCRIBE");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = broker.rss().saturating_sub(before);

    let mut seen = vec![false; MESSAGES];
    let mut count = 0;
    let mut marker_sent = false;
    let mut publisher = None;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let packet = match sub.recv(left).await {
            Received::Packet(p) => *p,
            other => panic!("after {count} retained messages: {other:?}"),
        };
        match packet {
            Packet::SubAck(_) if !marker_sent => {
                // The subscription exists: a live message published now comes after every
                // retained one.
                let mut p = RawConn::connected(addr, VERSION, "marker").await;
                let marker = publish_packet(
                    "flood/marker",
                    b"marker".to_vec(),
                    QoS::AtLeastOnce,
                    false,
                    1,
                );
                p.send(&encode(VERSION, &marker))
                    .await
                    .expect("publish marker");
                publisher = Some(p);
                marker_sent = true;
            }
            Packet::Publish(publish) => {
                if let Some(id) = publish.packet_id {
                    let ack = Packet::PubAck(PubResponse::success(id));
                    sub.send(&encode(VERSION, &ack)).await.expect("PUBACK");
                }
                let payload: Bytes = publish.payload.clone();
                if &payload[..] == b"marker" {
                    break;
                }
                let i: usize = std::str::from_utf8(&payload[..6])
                    .expect("utf-8")
                    .parse()
                    .expect("message number");
                assert!(!seen[i], "message {i} arrived twice");
                assert!(publish.retain, "message {i} without the retain flag");
                assert_eq!(publish.qos, qos_of(i), "QoS of message {i}");
                assert_eq!(publish.topic.as_str(), format!("flood/{i}"));
                seen[i] = true;
                count += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(publisher);
    let missing: Vec<usize> = (0..MESSAGES).filter(|&i| !seen[i]).collect();
    eprintln!(
        "held {held} B for the late reader; received {count} of {MESSAGES}, {} missing",
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{} retained messages never arrived, e.g. {:?} (QoS 0 missing: {}, QoS 1 missing: {})",
        missing.len(),
        &missing[..missing.len().min(10)],
        missing
            .iter()
            .filter(|&&i| qos_of(i) == QoS::AtMostOnce)
            .count(),
        missing
            .iter()
            .filter(|&&i| qos_of(i) != QoS::AtMostOnce)
            .count(),
    );
    assert!(
        held <= HELD_MARGIN,
        "the broker grew by {held} bytes for a subscriber that did not read (allowed {HELD_MARGIN})"
    );
    broker.stop();
}
