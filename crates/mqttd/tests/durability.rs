//! Durable sessions: what the broker acknowledged survives `kill -9`.
//!
//! Each test runs the real binary on a data directory, kills it with SIGKILL (no shutdown
//! code runs, as in a crash) and starts it again on the same directory. What users rely on:
//!
//! - every QoS 1 or QoS 2 message the broker acknowledged (PUBACK, PUBREC) to a publisher
//!   reaches every persistent session it matches, whether that session's client was offline
//!   at the crash or online with the message in flight; QoS 2 exactly once, QoS 1 at least
//!   once. A message published but not yet acknowledged at the crash may or may not arrive;
//! - a resumed session is reported (session present) and keeps its subscriptions, MQTT 5 and
//!   3.1.1 alike; retained messages, and their removal, survive;
//! - the will of a client that was connected at the crash is published after the restart,
//!   once its will delay has passed, and not for a client that came back in time;
//! - a damaged store (a file truncated, or bytes flipped) either stops the broker with a
//!   message naming the path, or is reported in the log; the broker never silently starts
//!   with less than it had, and a store without damage (after a graceful shutdown or a
//!   `kill -9`) is not reported as damaged.
//!
//! Clients whose session must outlive a connection the crash cut are
//! [`support::SessionClient`]s: a durable client keeps the identifiers of the QoS 2 messages
//! it acknowledged, which is what lets the broker's retransmission after the restart be
//! recognised as one, and its own messages in flight, to resend them.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use mqttd_client::{connect_tcp, Client, Events};
use mqttd_proto::client::{ClientConfig, Event};
use mqttd_proto::session::{Enqueued, OutboundState, Session};
use mqttd_proto::{
    ClientId, Message, PacketId, ProtocolVersion, QoS, ReasonCode, TopicFilter, TopicName, Will,
    WillProperties,
};

use support::{Broker, SessionClient};

/// Sync durability (the default, stated so that these tests keep testing it), and a session
/// queue large enough that nothing acknowledged is dropped for a full queue.
const CONFIG: &str = "durability = \"sync\"\nmax_queued_messages = 100000\n";
/// Session expiry of every persistent session, in seconds.
const EXPIRY: u32 = 3600;
/// How long a round of traffic may take to reach its crash point.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the subscribers have, after the last restart, to receive what they miss.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a client task may take to notice the broker is gone.
const TASK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the other tests wait for a message.
const TEN_S: Duration = Duration::from_secs(10);
/// Messages each publisher keeps unacknowledged: enough that every crash cuts flows in the
/// middle, below the broker's receive maximum (1024).
const WINDOW: usize = 100;

/// A client configuration for a session that outlives its connections: MQTT 5 with a session
/// expiry (or 3.1.1 with clean session 0), clean start only when there is nothing to resume.
fn persistent(id: &str, version: ProtocolVersion, clean_start: bool) -> ClientConfig {
    let mut config = ClientConfig::new(ClientId::try_from(id).expect("client id"));
    config.version = version;
    config.clean_start = clean_start;
    config.session_expiry_interval = EXPIRY;
    config
}

fn topic(name: &str) -> TopicName {
    TopicName::try_from(name).expect("topic name")
}

fn filter(name: &str) -> TopicFilter {
    TopicFilter::try_from(name).expect("topic filter")
}

/// Connects a [`SessionClient`], resuming `session` if there is one, and checks that the
/// broker says it resumed it (and that a new session is new).
async fn resume(
    broker: &Broker,
    id: &str,
    session: Option<Session>,
    auto_ack: bool,
) -> SessionClient {
    let resuming = session.is_some();
    let mut config = persistent(id, ProtocolVersion::V5, !resuming);
    config.auto_ack = auto_ack;
    let (client, ack) = SessionClient::connect(broker.mqtt, config, session)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", broker.log_tail()));
    assert_eq!(
        ack.session_present, resuming,
        "{id}: session present in CONNACK (resuming: {resuming})"
    );
    client
}

// ---------------------------------------------------------------------------------------------
// QoS 1 and QoS 2 traffic across crashes
// ---------------------------------------------------------------------------------------------

/// A publisher, across its connections.
struct Publisher {
    id: &'static str,
    topic: &'static str,
    qos: QoS,
    /// Its payloads are `{prefix}-{n}`, every one different.
    prefix: &'static str,
    /// The next `n`.
    next: u64,
    session: Option<Session>,
    /// Payloads the broker acknowledged: PUBACK for QoS 1, PUBREC for QoS 2.
    acked: Arc<Mutex<HashSet<Bytes>>>,
}

/// One report of a message to a subscriber, for the failure message if it comes twice.
#[derive(Debug)]
#[allow(dead_code)] // Read through `Debug`.
struct Receipt {
    /// Which of the subscriber's connections it came on (1 is the first).
    connection: usize,
    packet_id: Option<PacketId>,
    dup: bool,
}

/// Every payload a subscriber was given, with each time it was.
type Receipts = Arc<Mutex<HashMap<Bytes, Vec<Receipt>>>>;

/// A subscriber, across its connections.
struct Subscriber {
    id: &'static str,
    filter: &'static str,
    qos: QoS,
    session: Option<Session>,
    /// Connections so far.
    connections: usize,
    /// Each payload reported to the application, with each time it was.
    received: Receipts,
    /// Messages that came at a QoS other than the subscription's.
    wrong_qos: Arc<Mutex<Vec<String>>>,
}

/// What the clients do while a round runs.
#[derive(Debug, Clone, Copy)]
enum Subscribers {
    /// Not connected: the broker queues for them.
    Offline,
    /// Connected and receiving, acknowledging each message at once.
    Online,
    /// Connected and receiving, acknowledging in batches of this many (or after 50 ms of
    /// quiet), so that the crash finds messages received and not yet acknowledged.
    OnlineLateAcks(usize),
}

/// Whether a completed flow means the broker acknowledged the message. A PUBCOMP saying
/// "packet identifier not found" follows a PUBREC, so it counts for QoS 2.
fn acknowledged(qos: QoS, reason: ReasonCode) -> bool {
    !reason.is_error()
        || (qos == QoS::ExactlyOnce && reason == ReasonCode::PacketIdentifierNotFound)
}

/// Publishes numbered messages, keeping [`WINDOW`] of them unacknowledged, until the
/// connection closes (the broker was killed). With `more` false, publishes nothing new and
/// disconnects once every flow in flight completed, or when `stop` is set. Returns the session
/// and the next number.
async fn run_publisher(
    mut client: SessionClient,
    p: (&'static str, QoS, &'static str, u64),
    acked: Arc<Mutex<HashSet<Bytes>>>,
    total: Arc<AtomicUsize>,
    more: bool,
    stop: Arc<AtomicBool>,
) -> (Session, u64) {
    let (topic_name, qos, prefix, mut next) = p;
    let topic = topic(topic_name);
    let outstanding =
        |c: &SessionClient| c.session().in_flight().count() + c.session().queued().len();
    let record = |payload: Bytes| {
        if acked.lock().expect("lock").insert(payload) {
            total.fetch_add(1, Ordering::Relaxed);
        }
    };
    loop {
        while more && !client.is_closed() && outstanding(&client) < WINDOW {
            let payload = Bytes::from(format!("{prefix}-{next}"));
            match client.publish(Message::new(topic.clone(), payload, qos, false)) {
                Ok(Enqueued::Sent | Enqueued::Queued) => next += 1,
                Ok(other) => panic!("{prefix}-{next}: publish: {other:?}"),
                Err(_) => break,
            }
        }
        if !client.is_closed()
            && ((!more && outstanding(&client) == 0) || stop.load(Ordering::Relaxed))
        {
            for event in client.disconnect().await {
                if let Event::Delivered {
                    reason, delivery, ..
                } = event
                {
                    if acknowledged(qos, reason) {
                        record(delivery.message.payload.clone());
                    }
                }
            }
        }
        match client.next_event(Duration::from_millis(50)).await {
            Some(Event::Delivered {
                reason, delivery, ..
            }) if acknowledged(qos, reason) => record(delivery.message.payload.clone()),
            None if client.is_closed() => break,
            _ => {}
        }
    }
    // PUBREC came, PUBCOMP did not: acknowledged as well.
    for (_, flow) in client.session().in_flight() {
        if flow.state == OutboundState::ReleaseSent {
            record(flow.delivery.message.payload.clone());
        }
    }
    (client.into_session(), next)
}

/// Receives until the connection closes, or until `stop` is set (then disconnects). Records
/// each message as it is reported, and acknowledges it at once or, with `late_acks`, in
/// batches. Messages reported and not yet acknowledged when the connection is lost are
/// acknowledged afterwards, into the session, as a durable client does: a QoS 2 message's
/// retransmission is then answered without being reported again.
async fn run_subscriber(
    mut client: SessionClient,
    connection: usize,
    expected_qos: QoS,
    received: Receipts,
    wrong_qos: Arc<Mutex<Vec<String>>>,
    late_acks: Option<usize>,
    stop: Arc<AtomicBool>,
) -> Session {
    let mut unacked = Vec::new();
    let record = |event: Event, unacked: &mut Vec<_>| {
        let Event::Publish(p) = event else {
            return;
        };
        let payload = p.message.payload.clone();
        if p.message.qos != expected_qos {
            wrong_qos
                .lock()
                .expect("lock")
                .push(format!("{payload:?} at {:?}", p.message.qos));
        }
        received
            .lock()
            .expect("lock")
            .entry(payload)
            .or_default()
            .push(Receipt {
                connection,
                packet_id: p.packet_id,
                dup: p.dup,
            });
        if late_acks.is_some() {
            unacked.extend(p.packet_id);
        }
    };
    loop {
        if stop.load(Ordering::Relaxed) && !client.is_closed() {
            while let Some(event) = client.next_event(Duration::ZERO).await {
                record(event, &mut unacked);
            }
            for id in unacked.drain(..) {
                client.ack(id);
            }
            for event in client.disconnect().await {
                record(event, &mut unacked);
            }
        }
        match client.next_event(Duration::from_millis(50)).await {
            Some(event) => record(event, &mut unacked),
            None if client.is_closed() => break,
            // 50 ms of quiet: acknowledge the batch so far.
            None => unacked.drain(..).for_each(|id| client.ack(id)),
        }
        if late_acks.is_some_and(|n| unacked.len() >= n) {
            unacked.drain(..).for_each(|id| client.ack(id));
        }
    }
    for id in unacked {
        client.ack(id);
    }
    client.into_session()
}

/// Waits for a client task, which must end soon after its connection closed.
async fn join<T>(task: tokio::task::JoinHandle<T>, what: &str) -> T {
    tokio::time::timeout(TASK_TIMEOUT, task)
        .await
        .unwrap_or_else(|_| panic!("{what}: still running {TASK_TIMEOUT:?} after the crash"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Connects the subscribers (creating their sessions and subscriptions the first time) and
/// starts their tasks.
async fn start_subscribers(
    broker: &Broker,
    subscribers: &mut [Subscriber],
    late_acks: Option<usize>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Session>> {
    let mut tasks = Vec::new();
    for s in subscribers.iter_mut() {
        let first = s.session.is_none();
        let mut client = resume(broker, s.id, s.session.take(), late_acks.is_none()).await;
        s.connections += 1;
        if first {
            let ack = client.subscribe_one(s.filter, s.qos).await;
            assert!(
                ack.reasons.iter().all(|r| !r.is_error()),
                "{}: SUBACK {:?}",
                s.id,
                ack.reasons
            );
        }
        tasks.push(tokio::spawn(run_subscriber(
            client,
            s.connections,
            s.qos,
            s.received.clone(),
            s.wrong_qos.clone(),
            late_acks,
            stop.clone(),
        )));
    }
    tasks
}

/// Resumes the publishers and starts their tasks.
async fn start_publishers(
    broker: &Broker,
    publishers: &mut [Publisher],
    total: &Arc<AtomicUsize>,
    more: bool,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(Session, u64)>> {
    let mut tasks = Vec::new();
    for p in publishers.iter_mut() {
        let client = resume(broker, p.id, p.session.take(), true).await;
        tasks.push(tokio::spawn(run_publisher(
            client,
            (p.topic, p.qos, p.prefix, p.next),
            p.acked.clone(),
            total.clone(),
            more,
            stop.clone(),
        )));
    }
    tasks
}

/// The payload of the fence message published to `topic` at the end of a test.
fn fence_payload(topic: &str) -> Bytes {
    Bytes::from(format!("fence {topic}"))
}

/// The payloads in `acked` that `received` lacks, sorted.
fn missing<T>(acked: &HashSet<Bytes>, received: &HashMap<Bytes, T>) -> Vec<Bytes> {
    let mut missing: Vec<Bytes> = acked
        .iter()
        .filter(|p| !received.contains_key(*p))
        .cloned()
        .collect();
    missing.sort();
    missing
}

/// Publishers send numbered QoS 1 (to `dur/q1`) and QoS 2 (to `dur/q2`) messages as fast as
/// the broker acknowledges them; a subscriber to `dur/#` at QoS 1 and one to `dur/q2` at QoS 2
/// hold persistent sessions. The broker is killed mid-stream once 200, 1,000 and 3,000
/// messages were acknowledged in all: the first time with the subscribers receiving, the
/// second with them offline, the third with them receiving and acknowledging late (and
/// catching up on what was queued meanwhile). After each restart every client resumes its
/// session. After the last one, every acknowledged message must arrive, QoS 2 ones never twice
/// over the whole test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_and_qos2_survive_kill_9() {
    qos1_and_qos2_survive_kill_9_with(CONFIG).await;
}

/// `durability = "batch"` acknowledges once a change is written to the operating system, not
/// synced: a crash of the broker alone (kill -9) must still lose nothing.
///
/// kill -9 cannot tell an fsync from a plain write, so this test and the one above catch the
/// same failures. That under "sync" the watermark passes a change only once the fsync covering
/// it returned, and that "batch" fsyncs every `sync_interval`, is checked sync by sync in the
/// storage's unit tests (`mqttd-broker/src/storage/disk/tests.rs`); what a power cut at any
/// write leaves is checked in `mqttd-broker/src/storage/crash_points.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_and_qos2_survive_kill_9_with_batch_durability() {
    qos1_and_qos2_survive_kill_9_with(
        "durability = \"batch\"\nsync_interval_ms = 1000\nmax_queued_messages = 100000\n",
    )
    .await;
}

async fn qos1_and_qos2_survive_kill_9_with(config: &str) {
    let mut broker = Broker::start(config);
    let rounds = [
        (200, Subscribers::Online),
        (1_000, Subscribers::Offline),
        (3_000, Subscribers::OnlineLateAcks(32)),
    ];
    let mut publishers = [
        Publisher {
            id: "pub-q1",
            topic: "dur/q1",
            qos: QoS::AtLeastOnce,
            prefix: "q1",
            next: 0,
            session: None,
            acked: Arc::default(),
        },
        Publisher {
            id: "pub-q2",
            topic: "dur/q2",
            qos: QoS::ExactlyOnce,
            prefix: "q2",
            next: 0,
            session: None,
            acked: Arc::default(),
        },
    ];
    let mut subscribers = [
        Subscriber {
            id: "sub-all",
            filter: "dur/#",
            qos: QoS::AtLeastOnce,
            session: None,
            connections: 0,
            received: Arc::default(),
            wrong_qos: Arc::default(),
        },
        Subscriber {
            id: "sub-q2",
            filter: "dur/q2",
            qos: QoS::ExactlyOnce,
            session: None,
            connections: 0,
            received: Arc::default(),
            wrong_qos: Arc::default(),
        },
    ];
    let total = Arc::new(AtomicUsize::new(0));
    let never = Arc::new(AtomicBool::new(false));
    let started = Instant::now();

    for (round, (crash_at, mode)) in rounds.into_iter().enumerate() {
        let late_acks = match mode {
            Subscribers::Offline => None,
            Subscribers::Online => Some(None),
            Subscribers::OnlineLateAcks(n) => Some(Some(n)),
        };
        let sub_tasks = match late_acks {
            Some(late) => start_subscribers(&broker, &mut subscribers, late, &never).await,
            None => Vec::new(),
        };
        let pub_tasks = start_publishers(&broker, &mut publishers, &total, true, &never).await;
        let deadline = Instant::now() + ROUND_TIMEOUT;
        while total.load(Ordering::Relaxed) < crash_at {
            assert!(
                Instant::now() < deadline,
                "round {round}: only {} of {crash_at} messages acknowledged after {ROUND_TIMEOUT:?}\n{}",
                total.load(Ordering::Relaxed),
                broker.log_tail()
            );
            broker.assert_running();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        broker.kill();
        let mut cut = 0;
        for (p, task) in publishers.iter_mut().zip(pub_tasks) {
            let (session, next) = join(task, p.id).await;
            cut += session.in_flight().count();
            p.session = Some(session);
            p.next = next;
        }
        for (s, task) in subscribers.iter_mut().zip(sub_tasks) {
            s.session = Some(join(task, s.id).await);
        }
        eprintln!(
            "round {round} ({mode:?}): killed at {} acknowledged, {cut} publications in flight, {:?} into the test",
            total.load(Ordering::Relaxed),
            started.elapsed()
        );
        broker.restart();
    }

    // The last restart: everyone resumes; the publishers finish their flows and publish
    // nothing new.
    let stop_subscribers = Arc::new(AtomicBool::new(false));
    let stop_publishers = Arc::new(AtomicBool::new(false));
    let sub_tasks = start_subscribers(&broker, &mut subscribers, None, &stop_subscribers).await;
    let mut pub_tasks: Vec<_> =
        start_publishers(&broker, &mut publishers, &total, false, &stop_publishers)
            .await
            .into_iter()
            .map(Some)
            .collect();
    let publishing = tokio::time::timeout(DRAIN_TIMEOUT, async {
        for slot in &mut pub_tasks {
            if let Some(task) = slot.as_mut() {
                task.await.expect("publisher task");
                *slot = None;
            }
        }
    })
    .await;
    if publishing.is_err() {
        // Flows the broker does not complete leave their messages unacknowledged, which the
        // checks below allow; the broker must still deliver everything it acknowledged.
        eprintln!("publishers' flows still open after {DRAIN_TIMEOUT:?}");
        stop_publishers.store(true, Ordering::Relaxed);
        for (p, slot) in publishers.iter().zip(pub_tasks) {
            if let Some(task) = slot {
                join(task, p.id).await;
            }
        }
    }
    let acked_q1 = publishers[0].acked.lock().expect("lock").clone();
    let acked_q2 = publishers[1].acked.lock().expect("lock").clone();
    let acked_all: HashSet<Bytes> = acked_q1.union(&acked_q2).cloned().collect();
    let expected = [&acked_all, &acked_q2];
    // The fence: one more message on each topic, published after every publisher finished.
    // Each subscriber's session delivers in order, after what it had stored and what the
    // publishers sent, so once a subscriber has the fences of its topics, everything before
    // them (a late duplicate too) has arrived.
    let fence_topics: [&[&str]; 2] = [&["dur/q1", "dur/q2"], &["dur/q2"]];
    let (fencer, mut fencer_events, _) = connect(
        &broker,
        ClientConfig::new(ClientId::try_from("fencer").expect("id")),
    )
    .await;
    publish_acknowledged(
        &fencer,
        &mut fencer_events,
        vec![
            Message::new(
                topic("dur/q1"),
                fence_payload("dur/q1"),
                QoS::AtLeastOnce,
                false,
            ),
            Message::new(
                topic("dur/q2"),
                fence_payload("dur/q2"),
                QoS::ExactlyOnce,
                false,
            ),
        ],
    )
    .await;
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let fenced = subscribers.iter().zip(fence_topics).all(|(s, topics)| {
            let received = s.received.lock().expect("lock");
            topics
                .iter()
                .all(|t| received.contains_key(&fence_payload(t)))
        });
        if fenced {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fence messages did not arrive within {DRAIN_TIMEOUT:?}\n{}",
            broker.log_tail()
        );
        broker.assert_running();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_subscribers.store(true, Ordering::Relaxed);
    for task in sub_tasks {
        tokio::time::timeout(TASK_TIMEOUT, task)
            .await
            .expect("subscriber task ends after stop")
            .expect("subscriber task");
    }
    eprintln!(
        "acknowledged: {} QoS 1, {} QoS 2 (published {} and {}); {:?} in all",
        acked_q1.len(),
        acked_q2.len(),
        publishers[0].next,
        publishers[1].next,
        started.elapsed()
    );

    let mut failures = Vec::new();
    for (s, acked) in subscribers.iter().zip(expected) {
        let received = s.received.lock().expect("lock");
        let lost = missing(acked, &received);
        if !lost.is_empty() {
            failures.push(format!(
                "{} lost {} of {} acknowledged messages, e.g. {:?}",
                s.id,
                lost.len(),
                acked.len(),
                &lost[..lost.len().min(10)]
            ));
        }
        // Nothing that no publisher sent.
        let invented: Vec<&Bytes> = received
            .keys()
            .filter(|payload| {
                !fence_topics
                    .iter()
                    .any(|topics| topics.iter().any(|t| **payload == fence_payload(t)))
                    && !publishers.iter().any(|p| {
                        std::str::from_utf8(payload)
                            .ok()
                            .and_then(|t| t.strip_prefix(p.prefix)?.strip_prefix('-')?.parse().ok())
                            .is_some_and(|n: u64| n < p.next)
                            && (s.filter == "dur/#" || p.topic == s.filter)
                    })
            })
            .take(10)
            .collect();
        if !invented.is_empty() {
            failures.push(format!(
                "{} received messages never published: {invented:?}",
                s.id
            ));
        }
        let wrong_qos = s.wrong_qos.lock().expect("lock");
        if !wrong_qos.is_empty() {
            failures.push(format!(
                "{} (subscribed at {:?}) received {} messages at another QoS, e.g. {:?}",
                s.id,
                s.qos,
                wrong_qos.len(),
                &wrong_qos[..wrong_qos.len().min(5)]
            ));
        }
        if s.qos == QoS::ExactlyOnce {
            let twice: BTreeMap<&Bytes, &Vec<Receipt>> =
                received.iter().filter(|(_, r)| r.len() > 1).collect();
            if !twice.is_empty() {
                failures.push(format!(
                    "{} received {} QoS 2 messages more than once: {:?}",
                    s.id,
                    twice.len(),
                    twice.iter().take(10).collect::<Vec<_>>()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        broker.log_tail()
    );
    broker.stop();
}

// ---------------------------------------------------------------------------------------------
// Retained messages, sessions, wills
// ---------------------------------------------------------------------------------------------

/// Connects with the async client library.
async fn connect(broker: &Broker, config: ClientConfig) -> (Client, Events, bool) {
    let id = config.client_id.clone();
    let (client, events, ack) = connect_tcp(broker.mqtt, config, None)
        .await
        .unwrap_or_else(|e| panic!("{id:?}: {e}\n{}", broker.log_tail()));
    (client, events, ack.session_present)
}

/// Subscribes to one filter; the broker must grant it.
async fn subscribe(client: &Client, name: &str, qos: QoS) {
    let ack = client
        .subscribe_one(filter(name), qos)
        .await
        .expect("subscribe");
    assert!(
        ack.reasons.iter().all(|r| !r.is_error()),
        "SUBACK for {name}: {:?}",
        ack.reasons
    );
}

/// Publishes `messages` at once (QoS 1 or 2) and waits until the broker acknowledged every one.
async fn publish_acknowledged(client: &Client, events: &mut Events, messages: Vec<Message>) {
    let mut waiting: HashMap<(String, Bytes), usize> = HashMap::new();
    for message in messages {
        assert_ne!(
            message.qos,
            QoS::AtMostOnce,
            "only QoS 1 and 2 are acknowledged"
        );
        *waiting
            .entry((message.topic.to_string(), message.payload.clone()))
            .or_default() += 1;
        let outcome = client.publish(message).await.expect("publish");
        assert!(
            matches!(outcome, Enqueued::Sent | Enqueued::Queued),
            "{outcome:?}"
        );
    }
    let deadline = tokio::time::Instant::now() + ROUND_TIMEOUT;
    while !waiting.is_empty() {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("{} messages unacknowledged", waiting.len()))
            .expect("publisher connection open");
        match event {
            Event::Delivered {
                reason, delivery, ..
            } => {
                assert!(!reason.is_error(), "publish refused: {reason:?}");
                let key = (
                    delivery.message.topic.to_string(),
                    delivery.message.payload.clone(),
                );
                if let Some(n) = waiting.get_mut(&key) {
                    *n -= 1;
                    if *n == 0 {
                        waiting.remove(&key);
                    }
                }
            }
            Event::Closed { reason, .. } => panic!("publisher connection closed: {reason:?}"),
            _ => {}
        }
    }
}

/// Messages received until `done` holds for them, or until `timeout` (a bound only a hang
/// reaches: what must not arrive is proven absent with a fence message, not by waiting).
async fn collect(
    events: &mut Events,
    timeout: Duration,
    done: impl Fn(&[Message]) -> bool,
) -> Vec<Message> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut messages = Vec::new();
    while !done(&messages) {
        match tokio::time::timeout_at(deadline, events.next_message()).await {
            Ok(Some(p)) => messages.push(p.message),
            Ok(None) | Err(_) => break,
        }
    }
    messages
}

/// Publishes a fence message (not retained, QoS 1) to `topic` from a client of its own, and
/// waits until the broker acknowledged it.
async fn fence(broker: &Broker, topic_name: &str) {
    let (client, mut events, _) = connect(
        broker,
        ClientConfig::new(ClientId::try_from("fencer").expect("id")),
    )
    .await;
    publish_acknowledged(
        &client,
        &mut events,
        vec![Message::new(
            topic(topic_name),
            fence_payload(topic_name),
            QoS::AtLeastOnce,
            false,
        )],
    )
    .await;
    let _ = client.disconnect(ReasonCode::Success, None).await;
}

/// Whether `m` is a fence message.
fn is_fence(m: &Message) -> bool {
    m.payload == fence_payload(m.topic.as_str())
}

/// Retained messages as a subscriber to `ret/#` sees them: topic to payload, with RETAIN set.
fn retained(messages: &[Message]) -> BTreeMap<String, Bytes> {
    messages
        .iter()
        .map(|m| {
            assert!(m.retain, "{} arrived without RETAIN", m.topic);
            (m.topic.to_string(), m.payload.clone())
        })
        .collect()
}

/// Retained messages (set, replaced, and cleared, each acknowledged) and persistent sessions
/// (an MQTT 5 and a 3.1.1 one connected at the crash, an MQTT 5 one offline with a message
/// queued) survive `kill -9`: a new subscriber gets the retained messages as they stood, the
/// resumed sessions are reported as present and still hold their subscriptions and queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_and_sessions_survive_kill_9() {
    let mut broker = Broker::start(CONFIG);
    let sessions = [
        ("online-v5", ProtocolVersion::V5),
        ("online-v311", ProtocolVersion::V3_1_1),
        ("offline-v5", ProtocolVersion::V5),
    ];
    let mut connected = Vec::new();
    for (id, version) in sessions {
        // 3.1.1 has no clean start with a session expiry: clean session 0 is what persists.
        let clean_start = version == ProtocolVersion::V5;
        let (client, events, present) =
            connect(&broker, persistent(id, version, clean_start)).await;
        assert!(!present, "{id}: a session present on a fresh broker");
        subscribe(&client, "news/#", QoS::AtLeastOnce).await;
        connected.push((id, client, events));
    }
    let (_, offline, _) = connected.pop().expect("three clients");
    offline
        .disconnect(ReasonCode::Success, None)
        .await
        .expect("disconnect");

    let (publisher, mut pub_events, _) = connect(
        &broker,
        ClientConfig::new(ClientId::try_from("publisher").expect("id")),
    )
    .await;
    let message = |t: &str, payload: &'static str, retain: bool| {
        Message::new(topic(t), payload.as_bytes(), QoS::AtLeastOnce, retain)
    };
    publish_acknowledged(
        &publisher,
        &mut pub_events,
        vec![
            message("ret/a", "old-a", true),
            message("ret/a", "kept-a", true),
            message("ret/b", "kept-b", true),
            message("ret/gone", "old", true),
            message("ret/gone", "", true),
            message("news/1", "first", false),
        ],
    )
    .await;
    // The connected sessions have it; the offline one has it queued.
    for (id, _, events) in &mut connected {
        let got = collect(events, TEN_S, |m| m.iter().any(|m| m.payload == "first")).await;
        assert!(
            got.iter().any(|m| m.payload == "first"),
            "{id}: got {got:?}"
        );
    }

    broker.kill();
    drop(connected);
    broker.restart();

    let (fresh, mut fresh_events, _) = connect(
        &broker,
        ClientConfig::new(ClientId::try_from("fresh").expect("id")),
    )
    .await;
    subscribe(&fresh, "ret/#", QoS::AtLeastOnce).await;
    // The retained messages were put in the subscriber's queue when it subscribed; a message
    // published after SUBACK comes after them, so its arrival proves none is still to come.
    fence(&broker, "ret/fence").await;
    let mut got = collect(&mut fresh_events, TEN_S, |m| m.iter().any(is_fence)).await;
    assert!(
        got.iter().any(is_fence),
        "the fence message did not arrive; got {got:?}\n{}",
        broker.log_tail()
    );
    got.retain(|m| !is_fence(m));
    let expected: BTreeMap<String, Bytes> = [
        ("ret/a".to_owned(), Bytes::from("kept-a")),
        ("ret/b".to_owned(), Bytes::from("kept-b")),
    ]
    .into();
    assert_eq!(retained(&got), expected, "retained messages after kill -9");
    assert_eq!(got.len(), 2, "retained messages after kill -9: {got:?}");

    let mut resumed = Vec::new();
    for (id, version) in sessions {
        let (client, events, present) = connect(&broker, persistent(id, version, false)).await;
        assert!(present, "{id}: session present after kill -9 and restart");
        resumed.push((id, client, events));
    }
    let (publisher, mut pub_events, _) = connect(
        &broker,
        ClientConfig::new(ClientId::try_from("publisher-2").expect("id")),
    )
    .await;
    publish_acknowledged(
        &publisher,
        &mut pub_events,
        vec![message("news/2", "second", false)],
    )
    .await;
    for (id, _, events) in &mut resumed {
        let got = collect(events, TEN_S, |m| m.iter().any(|m| m.payload == "second")).await;
        let payloads: HashSet<&Bytes> = got.iter().map(|m| &m.payload).collect();
        // Its subscription survived.
        assert!(
            payloads.contains(&Bytes::from("second")),
            "{id}: no message through its subscription after the restart; got {got:?}\n{}",
            broker.log_tail()
        );
        // What was queued for it survived.
        if *id == "offline-v5" {
            assert!(
                payloads.contains(&Bytes::from("first")),
                "{id}: lost the message queued while it was offline; got {got:?}\n{}",
                broker.log_tail()
            );
        }
    }
    for (_, client, _) in resumed {
        client
            .disconnect(ReasonCode::Success, None)
            .await
            .expect("disconnect");
    }
    broker.stop();
}

/// A will with a delay, at QoS 1.
fn delayed_will(name: &str, payload: &'static str, delay: u32) -> Will {
    Will {
        topic: topic(name),
        payload: Bytes::from(payload),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: Some(delay),
            ..WillProperties::default()
        },
    }
}

/// Will delay of C, which comes back in time, in seconds: long enough that C surely reconnects
/// within it after the restart, even on a slow machine.
const C_WILL_DELAY: u32 = 8;
/// Will delay of D, which never comes back: longer than C's, so that D's will arriving proves
/// C's would have arrived before it had the broker not cancelled it.
const D_WILL_DELAY: u32 = C_WILL_DELAY + 2;

/// Clients A (will delay 1 s), C and D (will delays [`C_WILL_DELAY`] and [`D_WILL_DELAY`]),
/// with session expiry 60 s, are connected when the broker is killed; B holds a persistent
/// subscription to their will topics. After the restart C comes back at once, A and D never
/// do: B gets A's will, then D's, and not C's. The wills reach B's session in the order they
/// are published, and C's (counting from the same crash) would be published before D's, so
/// D's will is the fence: once it arrived, C's would have too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_of_connected_client_fires_after_crash() {
    let mut broker = Broker::start(CONFIG);
    let (b, _b_events, _) = connect(&broker, persistent("b", ProtocolVersion::V5, true)).await;
    subscribe(&b, "will/#", QoS::AtLeastOnce).await;
    let with_will = |id: &str, payload: &'static str, delay: u32| {
        let mut config = persistent(id, ProtocolVersion::V5, true);
        config.session_expiry_interval = 60;
        config.will = Some(delayed_will(&format!("will/{id}"), payload, delay));
        config
    };
    let (_a, _a_events, _) = connect(&broker, with_will("a", "a is gone", 1)).await;
    let mut c_config = with_will("c", "c is gone", C_WILL_DELAY);
    let (_c, _c_events, _) = connect(&broker, c_config.clone()).await;
    let (_d, _d_events, _) = connect(&broker, with_will("d", "d is gone", D_WILL_DELAY)).await;

    broker.kill();
    broker.restart();

    c_config.clean_start = false;
    let (c, _c_events, present) = connect(&broker, c_config).await;
    assert!(present, "c: session present after kill -9 and restart");
    let (_b, mut b_events, present) =
        connect(&broker, persistent("b", ProtocolVersion::V5, false)).await;
    assert!(present, "b: session present after kill -9 and restart");
    // Only a hang reaches this: D's will is due D_WILL_DELAY after the crash.
    let wait = Duration::from_secs(u64::from(D_WILL_DELAY) + 60);
    let got = collect(&mut b_events, wait, |m| {
        m.iter().any(|m| m.topic.as_str() == "will/d")
    })
    .await;
    let wills: Vec<(&str, &Bytes)> = got.iter().map(|m| (m.topic.as_str(), &m.payload)).collect();
    assert!(
        wills.contains(&("will/d", &Bytes::from("d is gone"))),
        "d's will (delay {D_WILL_DELAY} s) not published within {wait:?} of the restart; b got \
         {wills:?}\n{}",
        broker.log_tail()
    );
    assert!(
        wills.contains(&("will/a", &Bytes::from("a is gone"))),
        "a's will (delay 1 s) not published before d's; b got {wills:?}\n{}",
        broker.log_tail()
    );
    assert!(
        !wills.iter().any(|(t, _)| *t == "will/c"),
        "c's will published although c resumed its session within its will delay: {wills:?}"
    );
    c.disconnect(ReasonCode::Success, None)
        .await
        .expect("disconnect");
    broker.stop();
}

// ---------------------------------------------------------------------------------------------
// Damaged store
// ---------------------------------------------------------------------------------------------

/// Messages queued for the offline session before the damage.
const QUEUED: usize = 2_000;
/// Retained messages before the damage.
const RETAINED: usize = 50;

fn queued_payload(i: usize) -> Bytes {
    Bytes::from(format!("{i:05}-{}", "q".repeat(500)))
}

fn retained_payload(i: usize) -> Bytes {
    Bytes::from(format!("retained {i}"))
}

/// The largest of the files under `dir` (recursively) that `pick` accepts, with the length of
/// its data: up to its last non-zero byte, since the engine preallocates its journals (64 MiB of
/// zeros) and damage to the zeros beyond the data would test nothing.
fn fullest_file(dir: &Path, pick: &dyn Fn(&Path) -> bool) -> Option<(PathBuf, u64)> {
    let mut best: Option<(PathBuf, u64)> = None;
    for entry in std::fs::read_dir(dir).ok()? {
        let entry = entry.expect("directory entry");
        let meta = entry.metadata().expect("file metadata");
        let candidate = if meta.is_dir() {
            fullest_file(&entry.path(), pick)
        } else if meta.is_file() && pick(&entry.path()) {
            let bytes = std::fs::read(entry.path()).expect("read a store file");
            let len = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            Some((entry.path(), len as u64))
        } else {
            None
        };
        if let Some((path, len)) = candidate {
            if best.as_ref().is_none_or(|(_, l)| len > *l) {
                best = Some((path, len));
            }
        }
    }
    best
}

/// Whether `path` is one of the engine's journal files.
fn is_journal(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "jnl")
}

/// Whether `path` is a table file of the engine: a file under `keyspaces/.../tables/`.
fn is_table(path: &Path) -> bool {
    path.parent()
        .is_some_and(|p| p.file_name().is_some_and(|n| n == "tables"))
}

/// Cuts the file to half its data.
fn truncate_to_half(path: &Path, data_len: u64) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the store file");
    file.set_len(data_len / 2).expect("truncate the store file");
}

/// Inverts 16 bytes in the middle of the file's data.
fn flip_16_bytes(path: &Path, data_len: u64) {
    let mut bytes = std::fs::read(path).expect("read the store file");
    let middle = usize::try_from(data_len / 2).expect("file size");
    for b in &mut bytes[middle..middle + 16] {
        *b ^= 0xff;
    }
    std::fs::write(path, bytes).expect("write the store file");
}

/// The engine's journal ends each change with an end marker: tag 3, an 8-byte checksum and
/// the trailer `FJL` 3; the next change starts with tag 1.
fn is_end_marker(w: &[u8]) -> bool {
    w.len() == 13 && w[0] == 3 && &w[9..] == b"FJL\x03"
}

/// Breaks the start of the change nearest the middle of a journal's data (its tag byte made
/// invalid), leaving every complete change after it intact: the engine, which stops reading a
/// journal at the first entry it cannot decode, drops them all.
fn break_change_start(path: &Path, data_len: u64) {
    let mut bytes = std::fs::read(path).expect("read the journal");
    let middle = usize::try_from(data_len / 2).expect("file size");
    let start = bytes[..middle]
        .windows(13)
        .rposition(is_end_marker)
        .map(|i| i + 13)
        .expect("an end marker in the first half of the journal");
    assert_eq!(bytes[start], 1, "a change starts after an end marker");
    bytes[start] = 0xee;
    std::fs::write(path, bytes).expect("write the journal");
}

/// Inverts 16 bytes inside a stored message payload near the middle of a journal's data: every
/// length and marker stays intact, only the change's checksum no longer matches.
fn flip_payload_bytes(path: &Path, data_len: u64) {
    let mut bytes = std::fs::read(path).expect("read the journal");
    let middle = usize::try_from(data_len / 2).expect("file size");
    let needle = "q".repeat(64);
    let at = bytes[middle..]
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .map(|i| middle + i)
        .expect("a queued payload in the second half of the journal");
    for b in &mut bytes[at + 16..at + 32] {
        *b ^= 0xff;
    }
    std::fs::write(path, bytes).expect("write the journal");
}

/// The first warning or error in `log` about damage: one naming the store, or saying it found
/// something damaged or dropped something.
fn damage_report<'a>(log: &'a str, store: &Path) -> Option<&'a str> {
    const WORDS: [&str; 6] = [
        "damage", "corrupt", "truncat", "dropped", "checksum", "lost",
    ];
    let store = store.to_string_lossy();
    log.lines().find(|line| {
        let lower = line.to_lowercase();
        (line.contains("WARN") || line.contains("ERROR"))
            && (line.contains(&*store) || WORDS.iter().any(|w| lower.contains(w)))
    })
}

/// How the broker met a store: each of these is acceptable for some damage, and each test says
/// which one its damage must give, so that none passes by taking whichever branch happens.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// It exited at startup with an error naming a path in the store (not a panic).
    Refused,
    /// It started and warned about the damage, and something was indeed lost.
    Reported,
    /// It started and warned about the damage, saying that nothing was lost, and nothing was.
    ReportedNothingLost,
    /// It started without a word, and nothing was lost.
    Intact,
}

/// Fills a store: a persistent session with [`QUEUED`] messages queued while its client is
/// away, and [`RETAINED`] retained messages, all acknowledged.
async fn fill_store(broker: &Broker) {
    let sub_config = || persistent("offline-sub", ProtocolVersion::V5, false);
    let (sub, _, _) = connect(broker, sub_config()).await;
    subscribe(&sub, "bulk/#", QoS::AtLeastOnce).await;
    sub.disconnect(ReasonCode::Success, None)
        .await
        .expect("disconnect");
    let (publisher, mut pub_events, _) = connect(
        broker,
        ClientConfig::new(ClientId::try_from("filler").expect("id")),
    )
    .await;
    let mut messages: Vec<Message> = (0..QUEUED)
        .map(|i| Message::new(topic("bulk/q"), queued_payload(i), QoS::AtLeastOnce, false))
        .collect();
    messages.extend((0..RETAINED).map(|i| {
        Message::new(
            topic(&format!("keep/{i}")),
            retained_payload(i),
            QoS::AtLeastOnce,
            true,
        )
    }));
    publish_acknowledged(&publisher, &mut pub_events, messages).await;
    publisher
        .disconnect(ReasonCode::Success, None)
        .await
        .expect("disconnect");
}

/// Starts the broker again on its store and tells how it met it, checking what each outcome
/// requires: a refusal names a path in the store, a warning is about lost data that is really
/// lost (or says that nothing was, and nothing was), silence means nothing was lost.
async fn restart_on(broker: &mut Broker, what: &str) -> Outcome {
    let store = broker.data_dir().join("store");
    match broker.try_restart() {
        Err(failure) => {
            assert!(!failure.status.success(), "{failure}");
            assert!(
                !failure.stderr.contains("panicked"),
                "a panic is not a clear message about the {what} store\n{failure}"
            );
            assert!(
                failure.stderr.contains(&*store.to_string_lossy()),
                "the startup error names no path under {} ({what})\n{failure}",
                store.display()
            );
            eprintln!("{what}: refused to start:\n{}", failure.stderr);
            Outcome::Refused
        }
        Ok(()) => {
            let log = broker.log_text();
            let report = damage_report(&log, &store).map(str::to_owned);
            let lost = lost_data(broker).await;
            let outcome = match (&report, lost.is_empty()) {
                (Some(line), false) => {
                    eprintln!("{what}: reported: {line}\nlost: {}", lost.join("; "));
                    Outcome::Reported
                }
                (None, true) => Outcome::Intact,
                (Some(line), true) if line.contains("nothing is lost") => {
                    eprintln!("{what}: reported, nothing lost: {line}");
                    Outcome::ReportedNothingLost
                }
                (Some(line), true) => panic!(
                    "{what}: a warning about damage, but nothing was lost: {line}\n{}",
                    broker.log_tail()
                ),
                (None, false) => panic!(
                    "{what}: mqttd started without a word and lost data:\n{}\n{}",
                    lost.join("\n"),
                    broker.log_tail()
                ),
            };
            broker.shutdown();
            outcome
        }
    }
}

/// Fills a store, stops the broker (`kill -9` if `crash`, a graceful shutdown otherwise),
/// applies `damage` to the file with the most data of those `pick` accepts, and tells how the
/// broker met the store after that.
async fn damage_and_restart(
    crash: bool,
    pick: &dyn Fn(&Path) -> bool,
    damage: fn(&Path, u64),
    what: &str,
) -> Outcome {
    let mut broker = Broker::start(CONFIG);
    fill_store(&broker).await;
    if crash {
        broker.kill();
    } else {
        broker.shutdown();
    }
    let store = broker.data_dir().join("store");
    let (file, len) = fullest_file(&store, pick)
        .unwrap_or_else(|| panic!("no such file under {}", store.display()));
    // The queued payloads alone are 1 MB, most of it in one file.
    assert!(
        len >= 64 * 1024,
        "{}: {len} bytes of data, the most of any such file in the store",
        file.display()
    );
    damage(&file, len);
    eprintln!("{what}: {} ({len} bytes of data)", file.display());
    restart_on(&mut broker, what).await
}

/// What the restarted broker lacks of what [`fill_store`] stored.
async fn lost_data(broker: &Broker) -> Vec<String> {
    let mut lost = Vec::new();
    let (sub, mut events, present) = connect(
        broker,
        persistent("offline-sub", ProtocolVersion::V5, false),
    )
    .await;
    if !present {
        lost.push("the persistent session (session present = 0)".to_owned());
    }
    // Subscribing again keeps what the session holds and makes sure the fence, published
    // after it, reaches the session, behind whatever it had queued.
    subscribe(&sub, "bulk/#", QoS::AtLeastOnce).await;
    fence(broker, "bulk/fence").await;
    let got = collect(&mut events, ROUND_TIMEOUT, |m| m.iter().any(is_fence)).await;
    assert!(
        got.iter().any(is_fence),
        "the fence message did not arrive\n{}",
        broker.log_tail()
    );
    let payloads: HashSet<&Bytes> = got.iter().map(|m| &m.payload).collect();
    let queued_lost = (0..QUEUED)
        .filter(|i| !payloads.contains(&queued_payload(*i)))
        .count();
    if queued_lost > 0 {
        lost.push(format!("{queued_lost} of {QUEUED} queued messages"));
    }
    let _ = sub.disconnect(ReasonCode::Success, None).await;
    let (fresh, mut events, _) = connect(
        broker,
        ClientConfig::new(ClientId::try_from("checker").expect("id")),
    )
    .await;
    subscribe(&fresh, "keep/#", QoS::AtLeastOnce).await;
    fence(broker, "keep/fence").await;
    let got = collect(&mut events, ROUND_TIMEOUT, |m| m.iter().any(is_fence)).await;
    assert!(
        got.iter().any(is_fence),
        "the fence message did not arrive\n{}",
        broker.log_tail()
    );
    let retained_lost = (0..RETAINED)
        .filter(|i| {
            !got.iter().any(|m| {
                m.topic.as_str() == format!("keep/{i}") && m.payload == retained_payload(*i)
            })
        })
        .count();
    if retained_lost > 0 {
        lost.push(format!("{retained_lost} of {RETAINED} retained messages"));
    }
    let _ = fresh.disconnect(ReasonCode::Success, None).await;
    lost
}

/// After a graceful shutdown, a restart finds everything and says nothing of damage: the
/// engine's preallocated journal space it cuts at the start is not damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_restart_reports_no_damage() {
    let mut broker = Broker::start(CONFIG);
    fill_store(&broker).await;
    broker.shutdown();
    assert_eq!(
        restart_on(&mut broker, "clean restart").await,
        Outcome::Intact
    );
}

/// After `kill -9`, a restart replays the journal, finds everything and says nothing of
/// damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_restart_reports_no_damage() {
    let mut broker = Broker::start(CONFIG);
    fill_store(&broker).await;
    broker.kill();
    assert_eq!(
        restart_on(&mut broker, "restart after kill -9").await,
        Outcome::Intact
    );
}

/// The largest table file cut to half its data, after a graceful shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_store_is_reported_truncated_table() {
    let outcome = damage_and_restart(false, &is_table, truncate_to_half, "truncated table").await;
    assert_eq!(outcome, Outcome::Refused);
}

/// 16 bytes inverted in the middle of the data of the largest table file, after a graceful
/// shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_store_is_reported_flipped_table() {
    let outcome = damage_and_restart(false, &is_table, flip_16_bytes, "corrupted table").await;
    assert_eq!(outcome, Outcome::Refused);
}

/// After `kill -9` (everything is in the journal), a change in the middle of the journal made
/// unreadable: the engine drops it and every change after it, and the broker warns that the
/// journal was damaged and changes were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_store_is_reported_broken_journal() {
    let outcome = damage_and_restart(true, &is_journal, break_change_start, "broken journal").await;
    assert_eq!(outcome, Outcome::Reported);
}

/// After a graceful shutdown, a change in the middle of the journal made unreadable: the
/// engine drops it and every change after it, but the tables hold them all since the shutdown;
/// the broker warns about the damage and, having found every record the shutdown counted, says
/// that nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_store_is_reported_broken_journal_after_shutdown() {
    let outcome = damage_and_restart(
        false,
        &is_journal,
        break_change_start,
        "broken journal after a graceful shutdown",
    )
    .await;
    assert_eq!(outcome, Outcome::ReportedNothingLost);
}

/// After `kill -9`, 16 bytes inverted inside a message in the journal: the change's checksum
/// fails and the store is not opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_store_is_reported_flipped_journal() {
    let outcome =
        damage_and_restart(true, &is_journal, flip_payload_bytes, "corrupted journal").await;
    assert_eq!(outcome, Outcome::Refused);
}

/// After a graceful shutdown, the journal cut to half its data: everything it held is in the
/// tables by then, so nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_store_is_reported_truncated_journal() {
    let outcome =
        damage_and_restart(false, &is_journal, truncate_to_half, "truncated journal").await;
    assert_eq!(outcome, Outcome::Intact);
}
