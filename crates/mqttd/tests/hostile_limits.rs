//! Hostile clients meet the broker's limits, and nobody else notices.
//!
//! Three clients each try to make the broker hold without bound:
//!
//! - one subscribes to 100,000 distinct filters: past `max_subscriptions` each further filter
//!   gets SUBACK 0x97;
//! - one publishes 100,000 distinct retained topics at QoS 1: past `max_retained_messages`
//!   each further one gets PUBACK 0x97 and is not retained; one retained message that would
//!   pass `max_retained_bytes` gets 0x97 too;
//! - one creates 100,000 persistent sessions (MQTT 5 asking never to expire, and MQTT 3.1.1
//!   clean session 0, in turn) and abandons each with a reset: past `max_sessions` each
//!   further one is refused with CONNACK 0x97 (3.1.1: return code 3).
//!
//! The limits are small here ([`LIMIT`]) so that each test runs in seconds; what the default
//! limits bound is the same shape, larger. While each hostile client runs, a witness client
//! sends QoS 1 messages to itself, one at a time, and times each round trip (PUBLISH out,
//! PUBACK and the delivery back). What users rely on, checked for each case:
//!
//! - the broker refuses exactly what is past the limit, with its reason code, and counts each
//!   refusal in `mqttd_limit_refusals_total{limit}`;
//! - nothing acknowledged is lost: every witness message the broker acknowledged comes back
//!   to it, and every retained message acknowledged with success is retained (the gauge says
//!   exactly [`LIMIT`]);
//! - the broker's resident memory, sampled every 50 ms, stays within [`RSS_MARGIN`] of what it
//!   was before the hostile client started;
//! - the witness's round trips have a 99th percentile under [`P99_BOUND`](support::witness::P99_BOUND).
//!
//! The counts and the memory bound do not depend on the machine. The round-trip bound does:
//! the witness shares the cores with the hostile client, the broker and whatever else runs,
//! so each test prints its percentiles (`--nocapture`), with the witness alone just before the
//! attack, to tell the broker's delays from the machine's. Measured on a debug build, two
//! cores shared with 4-8 running compilers: alone, p99 0.4-9 ms; during the attack, p99 2-14
//! ms in the retained and sessions cases, the largest single round trip 25-90 ms. The
//! subscriptions case does not meet the bound yet and is ignored (see it for the figures).

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use mqttd_proto::codec::PacketReader;
use mqttd_proto::{
    Packet, PacketId, ProtocolVersion, QoS, ReasonCode, Subscribe, SubscribeProperties,
    Subscription, SubscriptionOptions, TopicFilter,
};

use support::{
    encode, publish_packet, session_connect_packet, subscribe_packet, within, Broker, RawConn,
    Received,
};

/// What each hostile client attempts.
const ATTEMPTS: usize = 100_000;
/// The limit each test sets for what its hostile client attempts.
const LIMIT: usize = 1_000;
/// How much the broker's resident memory may grow over its level before the hostile client
/// started. What it may legitimately add is [`LIMIT`] subscriptions, retained messages or
/// sessions (1-8 MiB measured, debug build) plus the allocator's and the runtime's working
/// size. Without the limits the same clients made a debug build grow by 376 MiB (100,000
/// subscriptions) and 154 MiB (100,000 offline sessions).
const RSS_MARGIN: u64 = 24 * 1024 * 1024;
/// A hang bound for any single step.
const STEP: Duration = Duration::from_secs(30);
const V5: ProtocolVersion = ProtocolVersion::V5;

fn config(limits: &str) -> String {
    format!("persistence = false\nsys_interval = 0\n{limits}\n")
}

/// Runs `hostile` under the shared witness ([`support::witness::under_witness`]), with this
/// file's memory bound.
async fn under_witness<T, F, Fut>(broker: &Broker, case: &str, hostile: F) -> Vec<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    support::witness::under_witness(broker, case, RSS_MARGIN, hostile).await
}

fn refusals(broker: &Broker, limit: &str) -> f64 {
    broker
        .metrics()
        .get(&format!("mqttd_limit_refusals_total{{limit=\"{limit}\"}}"))
}

// Run against a release broker (`MQTTD_TEST_BINARY`; scripts/test.sh has a section for it).
// A pass is 100,000 filters in 2.2 MB of SUBSCRIBEs, about 250 ms of a core for a debug
// broker, which keeps both of its workers busy in turn (the connection's task moves to the
// worker that sees its socket ready), so the OS wakes either of them late for the witness:
// on a debug build, 2 cores shared with compilers (load 3-11), the witness's p99 was 2-30 ms
// with 8 KiB of packets per turn, around the bound. The counts, the reason codes and the
// memory bound pass on either build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "its witness bound is for a release broker: run with MQTTD_TEST_BINARY"]
async fn subscribing_to_100000_filters_stops_at_max_subscriptions() {
    let broker = Broker::start(&config(&format!("max_subscriptions = {LIMIT}")));
    let addr = broker.mqtt;
    const PER_PACKET: usize = 100;
    // Encoded up front, so that the hostile client costs the machine little besides writing:
    // what the witness measures is the broker.
    let subscribes: Vec<u8> = (0..ATTEMPTS / PER_PACKET)
        .flat_map(|p| {
            let filters = (0..PER_PACKET)
                .map(|i| Subscription {
                    filter: TopicFilter::try_from(format!("hostile/{}/+/x", p * PER_PACKET + i))
                        .expect("valid filter"),
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..SubscriptionOptions::default()
                    },
                })
                .collect();
            let packet = Packet::Subscribe(Subscribe {
                packet_id: PacketId::new((p % 65_535 + 1) as u16).expect("non-zero"),
                properties: SubscribeProperties::default(),
                filters,
            });
            encode(V5, &packet)
        })
        .collect();
    let subscribes = Arc::new(subscribes);
    // One client, one connection: a pass after the first sends the same filters again (the
    // LIMIT it holds are replaced, the rest refused again).
    let conn = RawConn::connected(addr, V5, "hostile-subscriber").await;
    let (stream, _) = conn.into_parts();
    let halves = Arc::new(tokio::sync::Mutex::new(stream.into_split()));
    let passes = under_witness(&broker, "subscriptions", move || {
        let (subscribes, halves) = (subscribes.clone(), halves.clone());
        async move {
            let mut guard = halves.lock().await;
            let (rd, wr) = &mut *guard;
            let packets = ATTEMPTS / PER_PACKET;
            let read = async {
                let mut reader = PacketReader::new(u32::MAX);
                let mut buf = bytes::BytesMut::new();
                let (mut granted, mut refused, mut acks) = (0, 0, 0);
                while acks < packets {
                    match reader.read(&mut buf, Some(V5)) {
                        Ok(Some(Packet::SubAck(ack))) => {
                            acks += 1;
                            for r in ack.reasons {
                                match r {
                                    ReasonCode::QuotaExceeded => refused += 1,
                                    r if !r.is_error() => granted += 1,
                                    r => panic!("SUBACK reason {r:?}"),
                                }
                            }
                        }
                        Ok(Some(other)) => panic!("subscriber got {other:?}"),
                        Ok(None) => {
                            let n = within(STEP, "SUBACKs", rd.read_buf(&mut buf))
                                .await
                                .expect("read SUBACKs");
                            assert!(n > 0, "closed after {acks} SUBACKs");
                        }
                        Err(e) => panic!("undecodable: {e}"),
                    }
                }
                (granted, refused)
            };
            let write = async {
                for chunk in subscribes.chunks(64 * 1024) {
                    wr.write_all(chunk).await.expect("SUBSCRIBE");
                }
            };
            tokio::join!(read, write).0
        }
    })
    .await;
    for counts in &passes {
        assert_eq!(*counts, (LIMIT, ATTEMPTS - LIMIT), "(granted, refused)");
    }
    assert_eq!(
        refusals(&broker, "subscriptions"),
        (passes.len() * (ATTEMPTS - LIMIT)) as f64
    );
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_100000_retained_topics_stops_at_max_retained_messages() {
    const PAYLOAD: usize = 100;
    // Under max_packet_size (1 MiB), so that one message can pass it.
    const MAX_BYTES: usize = 512 * 1024;
    let broker = Broker::start(&config(&format!(
        "max_retained_messages = {LIMIT}\nmax_retained_bytes = {MAX_BYTES}"
    )));
    let addr = broker.mqtt;
    let passes = under_witness(&broker, "retained", move || async move {
        let conn = RawConn::connected(addr, V5, "hostile-retainer").await;
        let (stream, _) = conn.into_parts();
        let (mut rd, mut wr) = stream.into_split();
        // Within the broker's receive maximum (1024).
        let window = Arc::new(Semaphore::new(512));
        let acks = window.clone();
        let reader = tokio::spawn(async move {
            let mut reader = PacketReader::new(u32::MAX);
            let mut buf = bytes::BytesMut::new();
            let (mut accepted, mut refused) = (0, 0);
            while accepted + refused < ATTEMPTS {
                match reader.read(&mut buf, Some(V5)) {
                    Ok(Some(Packet::PubAck(ack))) => {
                        match ack.reason {
                            ReasonCode::QuotaExceeded => refused += 1,
                            r if !r.is_error() => accepted += 1,
                            r => panic!("PUBACK reason {r:?}"),
                        }
                        acks.add_permits(1);
                    }
                    Ok(Some(other)) => panic!("publisher got {other:?}"),
                    Ok(None) => {
                        let n = within(STEP, "PUBACKs", rd.read_buf(&mut buf))
                            .await
                            .expect("read PUBACKs");
                        assert!(n > 0, "closed after {} PUBACKs", accepted + refused);
                    }
                    Err(e) => panic!("undecodable: {e}"),
                }
            }
            (accepted, refused, rd, reader, buf)
        });
        let mut batch = Vec::new();
        for i in 0..ATTEMPTS {
            window.acquire().await.expect("window").forget();
            let mut payload = format!("{i:06}").into_bytes();
            payload.resize(PAYLOAD, b'.');
            let id = (i % 65_535 + 1) as u16;
            let packet = publish_packet(
                &format!("retained/{i}"),
                payload,
                QoS::AtLeastOnce,
                true,
                id,
            );
            batch.extend(encode(V5, &packet));
            if batch.len() > 16 * 1024 || i + 1 == ATTEMPTS || window.available_permits() == 0 {
                wr.write_all(&batch).await.expect("PUBLISH");
                batch.clear();
            }
        }
        let (accepted, refused, mut rd, mut reader, mut buf) = reader.await.expect("PUBACK reader");
        // A replacement past max_retained_bytes is refused too, and the old message stays.
        let big = publish_packet(
            "retained/0",
            vec![b'x'; MAX_BYTES],
            QoS::AtLeastOnce,
            true,
            1,
        );
        wr.write_all(&encode(V5, &big)).await.expect("PUBLISH");
        loop {
            match reader.read(&mut buf, Some(V5)) {
                Ok(Some(Packet::PubAck(ack))) => {
                    assert_eq!(ack.reason, ReasonCode::QuotaExceeded, "{ack:?}");
                    break;
                }
                Ok(Some(other)) => panic!("publisher got {other:?}"),
                Ok(None) => {
                    let n = within(STEP, "PUBACK", rd.read_buf(&mut buf))
                        .await
                        .expect("read PUBACK");
                    assert!(n > 0, "closed before the last PUBACK");
                }
                Err(e) => panic!("undecodable: {e}"),
            }
        }
        (accepted, refused)
    })
    .await;
    // A pass after the first replaces the same LIMIT messages and is refused the rest again.
    for counts in &passes {
        assert_eq!(*counts, (LIMIT, ATTEMPTS - LIMIT), "(accepted, refused)");
    }
    let metrics = broker.metrics();
    assert_eq!(
        metrics.get("mqttd_limit_refusals_total{limit=\"retained_messages\"}"),
        (passes.len() * (ATTEMPTS - LIMIT)) as f64
    );
    assert_eq!(
        metrics.get("mqttd_limit_refusals_total{limit=\"retained_bytes\"}"),
        passes.len() as f64
    );
    // Exactly what was acknowledged with success is retained, the first message unchanged.
    assert_eq!(metrics.get("mqttd_retained_messages"), LIMIT as f64);
    let mut sub = RawConn::connected(addr, V5, "reader").await;
    sub.send(&encode(
        V5,
        &subscribe_packet(1, "retained/0", QoS::AtMostOnce),
    ))
    .await
    .expect("SUBSCRIBE");
    let payload = loop {
        match sub.recv(STEP).await {
            Received::Packet(p) => match *p {
                Packet::SubAck(_) => {}
                Packet::Publish(p) => break p.payload,
                other => panic!("reader got {other:?}"),
            },
            other => panic!("no retained message for retained/0: {other:?}"),
        }
    };
    assert_eq!(&payload[..6], b"000000");
    assert_eq!(payload.len(), PAYLOAD);
    broker.stop();
}

/// A CONNECT asking for a persistent session: MQTT 5 asking never to expire, or MQTT 3.1.1
/// with clean session 0.
fn persistent_connect(version: ProtocolVersion, client_id: &str) -> Packet {
    session_connect_packet(version, client_id, (version == V5).then_some(u32::MAX))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_100000_persistent_sessions_stops_at_max_sessions() {
    const MAX_EXPIRY: u32 = 3600;
    const CONCURRENCY: usize = 16;
    let broker = Broker::start(&config(&format!(
        "max_sessions = {LIMIT}\nmax_session_expiry = {MAX_EXPIRY}"
    )));
    let addr = broker.mqtt;
    let passes = under_witness(&broker, "sessions", move || async move {
        let accepted = Arc::new(AtomicU64::new(0));
        let refused_v5 = Arc::new(AtomicU64::new(0));
        let refused_v3 = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(Semaphore::new(CONCURRENCY));
        let mut tasks = JoinSet::new();
        for i in 0..ATTEMPTS {
            let permit = gate.clone().acquire_owned().await.expect("gate");
            let (a, r5, r3) = (accepted.clone(), refused_v5.clone(), refused_v3.clone());
            tasks.spawn(async move {
                let _permit = permit;
                let version = if i % 2 == 0 {
                    V5
                } else {
                    ProtocolVersion::V3_1_1
                };
                let mut conn = RawConn::open(addr, version).await;
                conn.send(&encode(
                    version,
                    &persistent_connect(version, &format!("s{i}")),
                ))
                .await
                .expect("CONNECT");
                let ack = match conn.recv(STEP).await {
                    Received::Packet(p) => match *p {
                        Packet::ConnAck(ack) => ack,
                        other => panic!("session {i}: got {other:?}"),
                    },
                    other => panic!("session {i}: no CONNACK: {other:?}"),
                };
                match ack.reason {
                    ReasonCode::Success => {
                        if version == V5 {
                            // "Never" is granted as max_session_expiry, and the client told.
                            assert_eq!(ack.properties.session_expiry_interval, Some(MAX_EXPIRY));
                        }
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    ReasonCode::QuotaExceeded if version == V5 => {
                        r5.fetch_add(1, Ordering::Relaxed);
                    }
                    // Return code 3.
                    ReasonCode::ServerUnavailable if version != V5 => {
                        r3.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("session {i} ({version:?}): CONNACK {other:?}"),
                }
                // Abandoned: a reset, which leaves no TIME_WAIT behind to run out of ports.
                // (With a zero linger, closing does not block.)
                #[allow(deprecated)]
                let _ = conn.stream.set_linger(Some(Duration::ZERO));
            });
            while let Some(done) = tasks.try_join_next() {
                done.expect("session task");
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("session task");
        }
        let count = |c: &AtomicU64| c.load(Ordering::Relaxed) as usize;
        (count(&accepted), count(&refused_v5), count(&refused_v3))
    })
    .await;
    // A pass after the first resumes the same LIMIT sessions and is refused the rest again.
    for &(accepted, r5, r3) in &passes {
        eprintln!("sessions: {accepted} accepted, {r5} refused (MQTT 5), {r3} refused (3.1.1)");
        assert_eq!(accepted, LIMIT);
        assert_eq!(r5 + r3, ATTEMPTS - LIMIT);
        assert!(r5 > 0 && r3 > 0, "both versions were refused");
    }
    let metrics = broker
        .wait_for_metrics(STEP, |m| m.get("mqttd_connections_open") <= 0.0)
        .await;
    assert_eq!(
        metrics.get("mqttd_limit_refusals_total{limit=\"sessions\"}"),
        (passes.len() * (ATTEMPTS - LIMIT)) as f64
    );
    // The abandoned sessions are all held, offline.
    assert_eq!(metrics.get("mqttd_persistent_sessions"), LIMIT as f64);
    assert_eq!(metrics.get("mqttd_sessions"), LIMIT as f64);
    broker.stop();
}
