//! A subscriber that stops reading must cost the broker's other clients nothing, and must not
//! make the broker buffer without bound.
//!
//! A publisher sends numbered 1 KiB messages to one topic, never more than [`IN_FLIGHT`] ahead
//! of a fast subscriber, which checks that it receives every one, in order. The test runs in
//! phases of a fixed number of messages, alternately with the fast subscriber alone and with a
//! stalled subscriber on the same topic: a client whose socket has a 4 KiB receive buffer,
//! which completes CONNECT and SUBSCRIBE and then never reads again (a new one for each phase,
//! closed after it). Users rely on three things, checked for QoS 0 and for QoS 1 traffic (the
//! stalled client subscribes at the traffic's QoS):
//!
//! - the stalled subscriber does not block the others: the fast subscriber receives every
//!   message of every phase (the broker drops QoS 0 messages for a client whose output backs
//!   up, and keeps QoS 1 messages in its bounded session queue, dropping what does not fit);
//! - the broker's resident memory stays below its baseline plus 32 MiB while more than 48 MiB
//!   are published towards stalled clients, and what it drops for them is counted;
//! - a stalled subscriber costs little work: the broker's CPU time per message delivered to
//!   the fast subscriber with a stalled subscriber present stays within [`MAX_CPU_RATIO`]
//!   times that without it.
//!
//! Nothing here depends on how fast or how busy the machine is. Each phase is a count of
//! messages, and it ends when the fast subscriber has received the last one (a fence), not
//! after some time; the in-flight bound keeps the broker below every threshold at which it
//! would drop or queue a message for the fast subscriber, so every message must arrive; and
//! CPU time per message does not depend on how much of the CPU the broker got (the broker's
//! own CPU time, from `/proc`, excludes the test's clients). The deadlines only catch a hang.
//! The measure means the same in a debug build as in a release build (both run in the normal
//! suite); `cargo test -p mqttd --test stalled_subscriber -- --nocapture` prints it.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use mqttd_proto::{Packet, PacketId, ProtocolVersion, Publish, PublishProperties, QoS, TopicName};

use support::{encode, subscribe_packet, within, Broker, RawConn, Received};

const TOPIC: &str = "bench/t";
/// Payload bytes per message; the first eight carry its sequence number.
const PAYLOAD: usize = 1024;
/// Publish packets written per `write` call by the publisher, at most.
const BATCH: usize = 16;
/// Messages published and not yet received by the fast subscriber: 128 of about 1 KiB, well
/// below the 256 KiB of output at which the broker drops QoS 0 messages for a client, the 1000
/// QoS 1 messages it may have in flight towards one ([`CONFIG`]) and its receive maximum of
/// 1024 (the publisher's unacknowledged QoS 1 messages). The broker never has a reason to drop
/// or queue a message for the fast subscriber, so it must receive every one.
const IN_FLIGHT: usize = 8 * BATCH;
/// Messages per measured phase, at least.
const PHASE_MESSAGES: u64 = 30_000;
/// Broker CPU time per measured phase, at least: `/proc` counts it in ticks of 10 ms, so a
/// phase is 20 ticks or more, whatever the build's speed. A phase goes on, [`PHASE_STEP`]
/// messages at a time, until it has both this and [`PHASE_MESSAGES`].
const PHASE_CPU: Duration = Duration::from_millis(200);
const PHASE_STEP: u64 = 5_000;
/// Measured phases per condition; they alternate (alone, stalled, alone, stalled, ...) so
/// that whatever else the machine does affects both conditions alike.
const PHASES: usize = 4;
/// Messages published at a time while a new stalled client's buffers fill.
const FILL_STEP: u64 = 256;
/// What is published to fill a stalled client's buffers, at most: more than its socket
/// buffers, the broker's write buffer and session queue hold (1-5 MiB). A broker that does not
/// drop for it stops the fill here, to fail the memory checks.
const FILL_LIMIT: u64 = 16 * 1024 * 1024;
/// Memory the broker may add over the baseline while a stalled client is backlogged. What it
/// needs is the connection's write buffer (256 KiB high water; for QoS 1, the 1000 messages in
/// flight, 1 MiB) and the session queue (1000 messages, 1 MiB); measured growth is 1-4 MiB. A
/// broker that kept what it cannot send would exceed the margin, as more than
/// [`MIN_PUBLISHED_WHILE_STALLED`] is published towards stalled clients.
const RSS_MARGIN: u64 = 32 * 1024 * 1024;
/// What the phases with a stalled client publish, at least: [`PHASES`] x [`PHASE_MESSAGES`]
/// messages of 1036 bytes are 118 MiB, before the fills.
const MIN_PUBLISHED_WHILE_STALLED: u64 = 48 * 1024 * 1024;
/// The broker's CPU time per delivered message with a stalled subscriber present, at most, as
/// a multiple of that without one. Routing each message to a second subscriber and dropping it
/// there measures 0.94-1.10x in a debug build, idle or with both cores busy, and 0.95-1.08x in
/// a release build; a broker that kept retrying writes to the stalled socket, copied its
/// backlog around, or woke its task for every dropped message would cost several times more
/// (30 us of extra work per dropped message makes 3.7x in a debug build).
const MAX_CPU_RATIO: f64 = 2.0;
/// How long the fast subscriber may take to receive one batch of messages (a step of a phase
/// or of a fill): a fraction of a second on an idle machine, a few with both cores busy; only
/// a hang takes this long. A broker whose delivery waited on the stalled subscriber would
/// never end one (the stalled client's keep alive is off, so the broker has no reason to drop
/// it).
const PHASE_DEADLINE: Duration = Duration::from_secs(60);

/// Runs the variants one at a time, so that one's clients do not compete with the other's
/// broker. (Under nextest, which runs each test in a process of its own,
/// `.config/nextest.toml` gives these tests the whole machine.)
static SERIAL: Mutex<()> = Mutex::new(());

/// The broker's settings: defaults, except that 1000 QoS 1 messages may be in flight towards
/// a client, so that the fast subscriber's in-flight messages never wait in its session queue.
const CONFIG: &str = "max_inflight_messages = 1000\n";

#[test]
fn stalled_qos0_subscriber_neither_blocks_others_nor_grows_memory() {
    let report = run(QoS::AtMostOnce);
    report.assert_memory_bounded();
    report.assert_cpu_per_message_kept();
}

#[test]
fn stalled_qos1_subscriber_neither_blocks_others_nor_grows_memory() {
    let report = run(QoS::AtLeastOnce);
    report.assert_memory_bounded();
    report.assert_cpu_per_message_kept();
}

/// Splits complete packets off the front of `buf`, calling `f(first_byte, body)` for each. A
/// hand-rolled walk over fixed headers: the subscriber must be cheap, even in a debug build.
fn for_each_packet(buf: &mut BytesMut, mut f: impl FnMut(u8, &[u8])) {
    let mut at = 0;
    'packets: loop {
        let mut len = 0usize;
        let mut i = at + 1;
        for shift in [0, 7, 14, 21] {
            let Some(&b) = buf.get(i) else { break 'packets };
            len |= ((b & 0x7F) as usize) << shift;
            i += 1;
            if b & 0x80 == 0 {
                if buf.len() < i + len {
                    break 'packets;
                }
                f(buf[at], &buf[i..i + len]);
                at = i + len;
                continue 'packets;
            }
        }
        panic!("the broker sent a remaining length of five bytes");
    }
    buf.advance(at);
}

/// The packet identifier (QoS 1) and the sequence number of a PUBLISH body (3.1.1: topic,
/// identifier if QoS > 0, payload).
fn publish_fields(qos1: bool, body: &[u8]) -> ([u8; 2], u64) {
    let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2 + topic_len;
    let mut id = [0; 2];
    if qos1 {
        id = [body[at], body[at + 1]];
        at += 2;
    }
    let seq = u64::from_be_bytes(body[at..at + 8].try_into().expect("8-byte sequence number"));
    (id, seq)
}

/// Receives messages, checking that each is the next in sequence, and acknowledges QoS 1
/// ones at once. Returns an error at the first message missing or out of order.
async fn fast_subscriber(
    addr: std::net::SocketAddr,
    qos: QoS,
    received: Arc<AtomicU64>,
    credit: Arc<Semaphore>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut conn = RawConn::connected(addr, ProtocolVersion::V3_1_1, "fast").await;
    conn.send(&encode(conn.version, &subscribe_packet(1, TOPIC, qos)))
        .await
        .expect("SUBSCRIBE");
    match conn.recv(Duration::from_secs(30)).await {
        Received::Packet(p) if matches!(*p, Packet::SubAck(_)) => {}
        other => panic!("fast subscriber: expected SUBACK, got {other:?}"),
    }
    let (mut stream, mut buf) = conn.into_parts();
    buf.reserve(256 * 1024);
    let mut acks = Vec::new();
    let mut next = 0u64;
    let mut error = None;
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(100), stream.read_buf(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0) | Err(_)) => return Err("the broker closed the connection".to_owned()),
            Ok(Ok(_)) => {}
        }
        let mut n = 0;
        for_each_packet(&mut buf, |first, body| {
            if first >> 4 != 3 {
                return;
            }
            let qos1 = (first >> 1) & 3 == 1;
            let (id, seq) = publish_fields(qos1, body);
            if seq != next && error.is_none() {
                error = Some(format!("expected message {next}, received {seq}"));
            }
            next = seq + 1;
            n += 1;
            if qos1 {
                acks.extend_from_slice(&[0x40, 0x02, id[0], id[1]]);
            }
        });
        if let Some(error) = error {
            return Err(error);
        }
        received.fetch_add(n as u64, Ordering::Relaxed);
        credit.add_permits(n);
        if !acks.is_empty() {
            stream.write_all(&acks).await.expect("PUBACK");
            acks.clear();
        }
        if buf.capacity() - buf.len() < 64 * 1024 {
            buf.reserve(256 * 1024);
        }
    }
    Ok(())
}

/// Message `seq`, encoded.
fn publish_bytes(qos: QoS, packet_id: u16, seq: u64) -> Vec<u8> {
    let mut payload = vec![0xA5; PAYLOAD];
    payload[..8].copy_from_slice(&seq.to_be_bytes());
    let packet = Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: TopicName::try_from(TOPIC).expect("topic"),
        packet_id: PacketId::new(packet_id),
        properties: PublishProperties::default(),
        payload: payload.into(),
    });
    encode(ProtocolVersion::V3_1_1, &packet)
}

/// Publishes messages numbered from 0 until `target` have been, at most [`IN_FLIGHT`] ahead
/// of the fast subscriber (permits taken from `credit`, which the fast subscriber refills);
/// then waits for `target` to grow. Counts the bytes published. QoS 1 acknowledgements are
/// counted, and at the end each message must have had one.
async fn publisher(
    addr: std::net::SocketAddr,
    qos: QoS,
    credit: Arc<Semaphore>,
    target: Arc<AtomicU64>,
    published: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let conn = RawConn::connected(addr, ProtocolVersion::V3_1_1, "publisher").await;
    let (stream, _) = conn.into_parts();
    let (mut rd, mut wr) = stream.into_split();
    let acks = Arc::new(AtomicU64::new(0));
    let acker = {
        let acks = acks.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            loop {
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                for_each_packet(&mut buf, |first, _| {
                    assert_eq!(first, 0x40, "the publisher expects only PUBACK");
                    acks.fetch_add(1, Ordering::Relaxed);
                });
            }
        })
    };
    let mut next_id: u16 = 0;
    let mut batch = Vec::new();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let n = target
            .load(Ordering::Relaxed)
            .saturating_sub(sent)
            .min(BATCH as u64) as u32;
        if n == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let acquired =
            tokio::time::timeout(Duration::from_millis(100), credit.acquire_many(n)).await;
        let Ok(Ok(permits)) = acquired else { continue };
        permits.forget();
        batch.clear();
        for _ in 0..n {
            let id = if qos == QoS::AtMostOnce {
                0
            } else {
                next_id = next_id.checked_add(1).unwrap_or(1);
                next_id
            };
            batch.extend(publish_bytes(qos, id, sent));
            sent += 1;
        }
        wr.write_all(&batch).await.expect("publish");
        published.fetch_add(batch.len() as u64, Ordering::Relaxed);
    }
    if qos == QoS::AtLeastOnce {
        // Every QoS 1 message is acknowledged.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while acks.load(Ordering::Relaxed) < sent && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            acks.load(Ordering::Relaxed),
            sent,
            "PUBACKs for the QoS 1 messages published"
        );
    }
    acker.abort();
}

/// A client that connects with a small receive buffer and keep alive off, subscribes at
/// `qos`, and never reads again.
async fn stalled_subscriber(addr: std::net::SocketAddr, qos: QoS, name: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket.connect(addr).await.expect("connect");
    let mut conn = RawConn::from_stream(stream, ProtocolVersion::V3_1_1);
    let mut connect = support::connect_packet(conn.version, name);
    if let Packet::Connect(connect) = &mut connect {
        // Stalled for good: no keep-alive timeout ends it.
        connect.keep_alive = 0;
    }
    conn.send(&encode(conn.version, &connect))
        .await
        .expect("CONNECT");
    match conn.recv(Duration::from_secs(30)).await {
        Received::Packet(p) if matches!(&*p, Packet::ConnAck(ack) if !ack.reason.is_error()) => {}
        other => panic!("{name}: expected CONNACK, got {other:?}"),
    }
    conn.send(&encode(conn.version, &subscribe_packet(1, TOPIC, qos)))
        .await
        .expect("SUBSCRIBE");
    match conn.recv(Duration::from_secs(30)).await {
        Received::Packet(p) if matches!(*p, Packet::SubAck(_)) => {}
        other => panic!("{name}: expected SUBACK, got {other:?}"),
    }
    conn.into_parts().0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The test's side of a variant: the broker and the two clients' shared counters.
struct Traffic<'a> {
    broker: &'a Broker,
    /// Messages the publisher is to have published.
    target: Arc<AtomicU64>,
    /// Messages the fast subscriber received.
    received: Arc<AtomicU64>,
    /// Bytes published.
    published: Arc<AtomicU64>,
    fast: JoinHandle<Result<(), String>>,
    publisher: JoinHandle<()>,
}

impl Traffic<'_> {
    /// Publishes `n` more messages and waits until the fast subscriber has received every
    /// message so far, sampling the broker's memory into `peak_rss`.
    async fn deliver(&mut self, n: u64, peak_rss: &mut u64, what: &str) {
        let target = self.target.fetch_add(n, Ordering::Relaxed) + n;
        let deadline = tokio::time::Instant::now() + PHASE_DEADLINE;
        while self.received.load(Ordering::Relaxed) < target {
            if self.fast.is_finished() {
                let result = (&mut self.fast).await;
                panic!("{what}: the fast subscriber stopped: {result:?}");
            }
            assert!(
                !self.publisher.is_finished(),
                "{what}: the publisher stopped"
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: the fast subscriber received {} of {target} messages within \
                 {PHASE_DEADLINE:?}",
                self.received.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            *peak_rss = (*peak_rss).max(self.broker.rss());
        }
    }
}

/// The measured phases of one condition.
#[derive(Default)]
struct Condition {
    /// Broker CPU time over the phases.
    cpu: Duration,
    /// Messages the fast subscriber received over the phases.
    messages: u64,
    /// Broker CPU time per message in each phase.
    phases: Vec<Duration>,
}

impl Condition {
    /// Measures one phase: at least [`PHASE_MESSAGES`] delivered to the fast subscriber and
    /// [`PHASE_CPU`] used by the broker.
    async fn phase(&mut self, traffic: &mut Traffic<'_>, peak_rss: &mut u64, what: &str) {
        let cpu_before = traffic.broker.cpu_time();
        let mut messages = 0;
        let mut cpu = Duration::ZERO;
        while messages < PHASE_MESSAGES || cpu < PHASE_CPU {
            traffic.deliver(PHASE_STEP, peak_rss, what).await;
            messages += PHASE_STEP;
            cpu = traffic.broker.cpu_time() - cpu_before;
        }
        self.cpu += cpu;
        self.messages += messages;
        self.phases.push(cpu / messages as u32);
    }

    fn cpu_per_message(&self) -> Duration {
        self.cpu / self.messages.max(1) as u32
    }
}

/// What one variant measured.
struct Report {
    qos: QoS,
    /// The fast subscriber alone.
    alone: Condition,
    /// The fast subscriber with a stalled subscriber present.
    stalled: Condition,
    /// Broker memory after the warm-up.
    baseline_rss: u64,
    /// The largest memory sample while a stalled subscriber was connected.
    peak_rss: u64,
    /// Bytes and messages published while a stalled subscriber was connected.
    published_stalled: u64,
    messages_stalled: u64,
    /// Deliveries the broker counted as dropped while a stalled subscriber was connected.
    dropped_stalled: f64,
}

impl Report {
    fn cpu_ratio(&self) -> f64 {
        self.stalled.cpu_per_message().as_secs_f64()
            / self.alone.cpu_per_message().as_secs_f64().max(1e-9)
    }

    fn print(&self) {
        let qos = self.qos;
        eprintln!(
            "{qos:?}: broker CPU per message delivered to the fast subscriber: alone {:?} \
             (phases {:?}), with a stalled subscriber {:?} (phases {:?}); ratio {:.2}",
            self.alone.cpu_per_message(),
            self.alone.phases,
            self.stalled.cpu_per_message(),
            self.stalled.phases,
            self.cpu_ratio()
        );
        eprintln!(
            "{qos:?}: broker RSS {:.1} MiB at baseline, peak {:.1} MiB while {:.1} MiB ({} messages) \
             were published towards stalled subscribers; {} deliveries dropped meanwhile",
            mib(self.baseline_rss),
            mib(self.peak_rss),
            mib(self.published_stalled),
            self.messages_stalled,
            self.dropped_stalled
        );
    }

    /// The stalled clients really were backlogged, with tens of MiB, and the broker's memory
    /// did not follow.
    fn assert_memory_bounded(&self) {
        let qos = self.qos;
        assert!(
            self.published_stalled >= MIN_PUBLISHED_WHILE_STALLED,
            "{qos:?}: only {:.1} MiB published while a subscriber was stalled",
            mib(self.published_stalled)
        );
        // A stalled client absorbs its socket buffers and the broker's 256 KiB write buffer
        // (QoS 1: and the messages in flight or queued); everything else for it is dropped,
        // and counted.
        assert!(
            self.dropped_stalled >= 0.5 * self.messages_stalled as f64,
            "{qos:?}: {} deliveries dropped for {} messages published to a stalled subscriber",
            self.dropped_stalled,
            self.messages_stalled
        );
        assert!(
            self.peak_rss <= self.baseline_rss + RSS_MARGIN,
            "{qos:?}: broker RSS reached {:.1} MiB, more than {:.1} MiB over the baseline of {:.1} MiB",
            mib(self.peak_rss),
            mib(RSS_MARGIN),
            mib(self.baseline_rss)
        );
    }

    /// A stalled subscriber adds little to the broker's work per message for the others.
    fn assert_cpu_per_message_kept(&self) {
        assert!(
            self.cpu_ratio() <= MAX_CPU_RATIO,
            "{:?}: the broker spent {:?} of CPU time per message delivered to the fast \
             subscriber with a stalled subscriber present, {:.2} x the {:?} without one \
             (at most {MAX_CPU_RATIO} x)",
            self.qos,
            self.stalled.cpu_per_message(),
            self.cpu_ratio(),
            self.alone.cpu_per_message()
        );
    }
}

/// Runs one variant: a publisher and a fast subscriber at `qos`, and phases alternately
/// without and with a stalled subscriber at `qos` (a new one each time, closed afterwards).
fn run(qos: QoS) -> Report {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut broker = Broker::start(CONFIG);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let report = runtime.block_on(async {
        let addr = broker.mqtt;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let published = Arc::new(AtomicU64::new(0));
        let target = Arc::new(AtomicU64::new(0));
        let credit = Arc::new(Semaphore::new(IN_FLIGHT));
        let fast = tokio::spawn(fast_subscriber(
            addr,
            qos,
            received.clone(),
            credit.clone(),
            stop.clone(),
        ));
        // Wait for the subscription before publishing.
        let metrics = broker
            .wait_for_metrics(Duration::from_secs(30), |m| {
                m.get("mqttd_subscriptions") >= 1.0
            })
            .await;
        assert!(
            metrics.get("mqttd_subscriptions") >= 1.0,
            "the fast subscriber's subscription within 30 s"
        );
        let publisher = tokio::spawn(publisher(
            addr,
            qos,
            credit,
            target.clone(),
            published.clone(),
            stop.clone(),
        ));
        let mut traffic = Traffic {
            broker: &broker,
            target,
            received,
            published,
            fast,
            publisher,
        };

        // Warm-up: buffers and allocator reach their working size.
        let mut ignored = 0;
        traffic
            .deliver(PHASE_MESSAGES, &mut ignored, "warm-up")
            .await;
        let baseline_rss = broker.rss();
        let mut peak_rss = baseline_rss;
        let message_len = publish_bytes(qos, qos.bits().into(), 0).len() as u64;
        let (mut alone, mut stalled) = (Condition::default(), Condition::default());
        let mut published_stalled = 0;
        let mut dropped_stalled = 0.0;
        for i in 0..PHASES {
            alone
                .phase(&mut traffic, &mut ignored, &format!("phase {i} alone"))
                .await;

            let what = format!("phase {i} with a stalled subscriber");
            let dropped_before = broker.metrics().get("mqttd_messages_dropped_total");
            let published_before = traffic.published.load(Ordering::Relaxed);
            let stalled_client = stalled_subscriber(addr, qos, &format!("stalled-{i}")).await;
            // Publish until the broker drops messages for the stalled client: its buffers
            // (and, for QoS 1, its session queue) are full.
            loop {
                traffic.deliver(FILL_STEP, &mut peak_rss, &what).await;
                let dropped = broker.metrics().get("mqttd_messages_dropped_total");
                let filled = traffic.published.load(Ordering::Relaxed) - published_before;
                if dropped > dropped_before || filled >= FILL_LIMIT {
                    break;
                }
            }
            stalled.phase(&mut traffic, &mut peak_rss, &what).await;
            published_stalled += traffic.published.load(Ordering::Relaxed) - published_before;
            dropped_stalled +=
                broker.metrics().get("mqttd_messages_dropped_total") - dropped_before;
            // Closing with unread data resets the connection; the broker's pending write
            // fails. Wait until it is gone: only the publisher and the fast subscriber remain.
            drop(stalled_client);
            let metrics = broker
                .wait_for_metrics(Duration::from_secs(30), |m| {
                    m.get("mqttd_connections_open") == 2.0
                })
                .await;
            assert_eq!(
                metrics.get("mqttd_connections_open"),
                2.0,
                "{what}: connections open 30 s after the stalled client closed"
            );
        }

        stop.store(true, Ordering::Relaxed);
        within(
            Duration::from_secs(60),
            "the publisher's end",
            traffic.publisher,
        )
        .await
        .expect("publisher task");
        let fast = within(
            Duration::from_secs(60),
            "the fast subscriber's end",
            traffic.fast,
        )
        .await
        .expect("fast subscriber task");
        assert_eq!(fast, Ok(()), "the fast subscriber");
        broker.assert_running();
        Report {
            qos,
            alone,
            stalled,
            baseline_rss,
            peak_rss,
            published_stalled,
            messages_stalled: published_stalled / message_len,
            dropped_stalled,
        }
    });
    drop(runtime);
    broker.stop();
    report.print();
    report
}
