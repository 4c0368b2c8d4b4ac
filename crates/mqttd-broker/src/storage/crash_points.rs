//! Crash points at the storage layer: a scripted run of the broker (persistent QoS 1 and QoS 2
//! subscribers, a QoS 1 and a persistent QoS 2 publisher, a subscriber going away and coming
//! back, a takeover) is repeated with a simulated power cut after exactly the first N writes
//! of data to the store, for every N the run makes; then the store is opened again and what it
//! recovered is checked against what the clients saw before the cut:
//!
//! - every message whose publisher got its acknowledgement is held for every persistent session
//!   that subscribed to it, unless that session's client already has it;
//! - QoS 2 state never leads to a double delivery: a message that the QoS 2 subscriber has is
//!   recovered with the packet identifier it came under, and as released unless the client
//!   still awaits the release; a QoS 2 publication that was routed and that its publisher will
//!   send again is recovered as received (awaiting PUBREL), so the resend is not routed again;
//! - nothing appears that was not published.
//!
//! A cut falls between any two writes, including the two of one recording call, so the order
//! of writes inside the store is checked as well as the broker's order of calls.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqttd_client::{connect_tcp, Client, Events};
use mqttd_proto::client::{ClientConfig, Event};
use mqttd_proto::session::{OutboundState, Session};
use mqttd_proto::{ClientId, Delivery, Message, PacketId, QoS, ReasonCode, TopicFilter, TopicName};
use tokio::sync::watch;

use super::disk::PowerCut;
use super::{
    DiskStorage, Durability, Recovered, SessionRecord, Storage, StorageBatch, Ticket, Watermark,
};
use crate::{Broker, Config, ListenerKind};

/// Upper bound on any wait: only a hang reaches it.
const HANG: Duration = Duration::from_secs(30);
/// Messages each publisher sends in each phase.
const PER_PHASE: usize = 3;

/// The store shared with the broker, so that the test can drop it (closing its files) once
/// the broker let go of it.
struct Shared(Arc<DiskStorage>);

impl Storage for Shared {
    fn recover(&self) -> Result<Recovered, super::StorageError> {
        self.0.recover()
    }
    fn retain(&self, message: &Arc<Message>) -> Ticket {
        self.0.retain(message)
    }
    fn save_session(&self, record: &SessionRecord) -> Ticket {
        self.0.save_session(record)
    }
    fn remove_session(&self, client_id: &ClientId) -> Ticket {
        self.0.remove_session(client_id)
    }
    fn remove_messages(&self, client_id: &ClientId) -> Ticket {
        self.0.remove_messages(client_id)
    }
    fn store_delivery(&self, client_id: &ClientId, delivery: &Delivery) -> Ticket {
        self.0.store_delivery(client_id, delivery)
    }
    fn delivery_flow(&self, c: &ClientId, seq: u64, p: PacketId, s: OutboundState) -> Ticket {
        self.0.delivery_flow(c, seq, p, s)
    }
    fn delivery_done(&self, client_id: &ClientId, delivery: &Delivery) -> Ticket {
        self.0.delivery_done(client_id, delivery)
    }
    fn pending_release(&self, c: &ClientId, p: PacketId, pending: bool) -> Ticket {
        self.0.pending_release(c, p, pending)
    }
    fn delivery_fence(&self, client_id: &ClientId) -> super::Fence {
        self.0.delivery_fence(client_id)
    }
    fn open_batch(&self) -> Option<Box<dyn StorageBatch + '_>> {
        self.0.open_batch()
    }
    fn watermark(&self) -> watch::Receiver<Watermark> {
        self.0.watermark()
    }
    fn is_durable(&self) -> bool {
        self.0.is_durable()
    }
    fn close(&self) {
        self.0.close();
    }
}

/// What the clients saw before the cut.
#[derive(Default)]
struct Seen {
    /// Every payload a publisher sent (or tried to).
    published: HashSet<Bytes>,
    /// Payloads whose publisher got PUBACK (QoS 1) or PUBCOMP (QoS 2).
    acked: HashSet<Bytes>,
    /// Per subscriber: each message received, with its packet identifier.
    received: HashMap<&'static str, Vec<(Bytes, Option<PacketId>)>>,
    /// Sessions the clients hold when the run stops.
    sessions: HashMap<&'static str, Session>,
}

type SeenRef = Arc<Mutex<Seen>>;

fn id(s: &str) -> ClientId {
    ClientId::try_from(s).expect("client id")
}

fn persistent(name: &str, clean_start: bool) -> ClientConfig {
    let mut config = ClientConfig::new(id(name));
    config.clean_start = clean_start;
    config.session_expiry_interval = 600;
    config
}

/// Waits for `fut`, unless the power is cut first (`None`).
async fn unless_cut<T>(cut: &PowerCut, fut: impl std::future::Future<Output = T>) -> Option<T> {
    let cut_seen = async {
        while !cut.happened() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    tokio::select! {
        v = tokio::time::timeout(HANG, fut) => Some(v.expect("the broker hung")),
        () = cut_seen => None,
    }
}

/// A subscriber connection: records what it receives until its connection ends.
fn receive(
    name: &'static str,
    mut events: Events,
    seen: SeenRef,
) -> tokio::task::JoinHandle<Events> {
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                Event::Publish(p) => seen
                    .lock()
                    .expect("lock")
                    .received
                    .entry(name)
                    .or_default()
                    .push((p.message.payload.clone(), p.packet_id)),
                Event::Closed { .. } => break,
                _ => {}
            }
        }
        events
    })
}

/// Publishes one message and waits for its flow to complete.
async fn publish(
    client: &Client,
    events: &mut Events,
    seen: &SeenRef,
    cut: &PowerCut,
    topic: &str,
    payload: String,
    qos: QoS,
) -> Option<()> {
    let payload = Bytes::from(payload);
    seen.lock().expect("lock").published.insert(payload.clone());
    let message = Message::new(
        TopicName::try_from(topic).expect("topic"),
        payload.clone(),
        qos,
        false,
    );
    let _ = unless_cut(cut, client.publish(message))
        .await?
        .expect("publish");
    loop {
        match unless_cut(cut, events.recv()).await? {
            Some(Event::Delivered {
                reason, delivery, ..
            }) if delivery.message.payload == payload => {
                assert!(!reason.is_error(), "{payload:?}: {reason:?}");
                seen.lock().expect("lock").acked.insert(payload);
                return Some(());
            }
            Some(_) => {}
            None => panic!("publisher connection lost"),
        }
    }
}

/// Waits until subscriber `name` received every payload in `expected`.
async fn received_all(
    seen: &SeenRef,
    cut: &PowerCut,
    name: &str,
    expected: &[String],
) -> Option<()> {
    unless_cut(cut, async {
        loop {
            let done = {
                let seen = seen.lock().expect("lock");
                let got: HashSet<&Bytes> = seen
                    .received
                    .get(name)
                    .map(|r| r.iter().map(|(p, _)| p).collect())
                    .unwrap_or_default();
                expected
                    .iter()
                    .all(|e| got.contains(&Bytes::from(e.clone())))
            };
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
}

async fn connect(
    addr: SocketAddr,
    config: ClientConfig,
    session: Option<Session>,
) -> (Client, Events) {
    let name = config.client_id.clone();
    let (client, events, _) = connect_tcp(addr, config, session)
        .await
        .unwrap_or_else(|e| panic!("{name:?}: connect: {e:?}"));
    (client, events)
}

async fn subscribe(client: &Client, filter: &str, qos: QoS) {
    let ack = client
        .subscribe_one(TopicFilter::try_from(filter).expect("filter"), qos)
        .await
        .expect("subscribe");
    assert!(
        ack.reasons.iter().all(|r| !r.is_error()),
        "{:?}",
        ack.reasons
    );
}

/// Sends DISCONNECT and keeps the client's session (unless the broker closed the connection,
/// as it does to one taken over).
async fn keep_session(seen: &SeenRef, name: &'static str, client: &Client) {
    let result = tokio::time::timeout(HANG, client.disconnect(ReasonCode::Success, None))
        .await
        .expect("disconnect in time");
    if let Ok(session) = result {
        let session = session.expect("a session to keep");
        seen.lock().expect("lock").sessions.insert(name, session);
    }
}

/// The scripted run, until it ends or the power is cut. Returns the clients still connected.
async fn script(addr: SocketAddr, seen: &SeenRef, cut: &PowerCut) -> Vec<(&'static str, Client)> {
    let mut open = Vec::new();
    let _ = steps(addr, seen, cut, &mut open).await;
    open
}

async fn steps(
    addr: SocketAddr,
    seen: &SeenRef,
    cut: &PowerCut,
    open: &mut Vec<(&'static str, Client)>,
) -> Option<()> {
    let connect = |name: &'static str, config, session| async move {
        let (client, events) = unless_cut(cut, connect(addr, config, session)).await?;
        Some((name, client, events))
    };
    let (_, pub1, mut pub1_events) = connect("pub1", ClientConfig::new(id("pub1")), None).await?;
    open.push(("pub1", pub1.clone()));
    let (_, pub2, mut pub2_events) = connect("pub2", persistent("pub2", true), None).await?;
    open.push(("pub2", pub2.clone()));
    let (_, sub1, e) = connect("sub1", persistent("sub1", true), None).await?;
    let mut sub1_task = receive("sub1", e, seen.clone());
    open.push(("sub1", sub1.clone()));
    unless_cut(cut, subscribe(&sub1, "t/#", QoS::AtLeastOnce)).await?;
    let (_, sub2, e) = connect("sub2", persistent("sub2", true), None).await?;
    receive("sub2", e, seen.clone());
    open.push(("sub2", sub2.clone()));
    unless_cut(cut, subscribe(&sub2, "t/#", QoS::ExactlyOnce)).await?;
    let mut all = Vec::new();
    for phase in ["a", "b", "c", "d"] {
        match phase {
            // sub2 goes away: the broker queues for it.
            "b" => {
                open.retain(|(name, _)| *name != "sub2");
                // Not cut short: the client keeps its session whatever the broker stores.
                keep_session(seen, "sub2", &sub2).await;
            }
            // sub1 is taken over by a new connection.
            "c" => {
                let (_, sub1b, e) = connect("sub1", persistent("sub1", false), None).await?;
                open.retain(|(name, _)| *name != "sub1");
                open.push(("sub1", sub1b));
                let _ = unless_cut(cut, &mut sub1_task).await?;
                sub1_task = receive("sub1", e, seen.clone());
            }
            // sub2 comes back and gets what was queued.
            "d" => {
                // The session stays kept until the connection is up.
                let session = seen.lock().expect("lock").sessions.get("sub2").cloned();
                let (_, sub2, e) = connect("sub2", persistent("sub2", false), session).await?;
                receive("sub2", e, seen.clone());
                open.push(("sub2", sub2));
            }
            _ => {}
        }
        let mut sent = Vec::new();
        for i in 0..PER_PHASE {
            let p = format!("q1-{phase}{i}");
            let q1 = QoS::AtLeastOnce;
            publish(&pub1, &mut pub1_events, seen, cut, "t/q1", p.clone(), q1).await?;
            sent.push(p);
            let p = format!("q2-{phase}{i}");
            let q2 = QoS::ExactlyOnce;
            publish(&pub2, &mut pub2_events, seen, cut, "t/q2", p.clone(), q2).await?;
            sent.push(p);
        }
        all.extend(sent.iter().cloned());
        received_all(seen, cut, "sub1", &sent).await?;
        if phase != "b" && phase != "c" {
            received_all(seen, cut, "sub2", &all).await?;
        }
    }
    Some(())
}

/// One run with a cut after `writes` writes; returns how many writes the run attempted and
/// whether the cut fell inside it.
async fn run(dir: &Path, writes: u64) -> (u64, bool) {
    let store = dir.join("store");
    let cut = PowerCut::after(writes);
    let mut storage = Arc::new(
        DiskStorage::open_with_power_cut(
            store.clone(),
            Durability::Batch,
            Duration::from_secs(3600),
            cut.clone(),
        )
        .expect("open the store"),
    );
    let config = Config {
        listen: vec!["tcp://127.0.0.1:0".into()],
        data_dir: dir.join("data"),
        ..Config::default()
    };
    let broker = Broker::builder(config)
        .storage(Shared(storage.clone()))
        .start()
        .await
        .expect("start the broker");
    let addr = broker.addr(ListenerKind::Tcp).expect("tcp listener");
    let seen = SeenRef::default();
    let open = script(addr, &seen, &cut).await;
    let happened = cut.happened();
    // The clients keep their sessions, as durable clients do; what they see after the cut
    // depends only on what was stored before it, since the watermark stops there.
    for (name, client) in &open {
        keep_session(&seen, name, client).await;
    }
    storage.power_off();
    broker.shutdown().await;
    let attempted = cut.writes();
    let deadline = Instant::now() + HANG;
    let storage = loop {
        match Arc::try_unwrap(storage) {
            Ok(s) => break s,
            Err(s) => {
                assert!(Instant::now() < deadline, "the broker keeps its store");
                tokio::time::sleep(Duration::from_millis(5)).await;
                storage = s;
            }
        }
    };
    drop(storage);

    let reopened =
        DiskStorage::open(store, Durability::Sync, Duration::from_millis(100)).expect("reopen");
    let recovered = reopened.recover().expect("recover");
    drop(reopened);
    let seen = std::mem::take(&mut *seen.lock().expect("lock"));
    let failures = check(&seen, &recovered);
    if !failures.is_empty() {
        let summary: Vec<_> = recovered
            .sessions
            .iter()
            .map(|s| {
                let messages: Vec<_> = s
                    .deliveries
                    .iter()
                    .map(|d| (d.delivery.message.payload.clone(), d.flow))
                    .collect();
                (
                    s.record.client_id.to_string(),
                    messages,
                    &s.pending_releases,
                )
            })
            .collect();
        panic!(
            "power cut after write {writes} of {attempted}:\n{}\nreceived: {:?}\nclient \
             sessions awaiting PUBREL: {:?}\nrecovered: {summary:?}",
            failures.join("\n"),
            seen.received,
            seen.sessions
                .iter()
                .map(|(k, s)| (k, s.pending_releases().collect::<Vec<_>>()))
                .collect::<Vec<_>>(),
        );
    }
    (attempted, happened)
}

/// What is wrong with `recovered`, given what the clients saw.
fn check(seen: &Seen, recovered: &Recovered) -> Vec<String> {
    let mut failures = Vec::new();
    let sessions: HashMap<&str, _> = recovered
        .sessions
        .iter()
        .map(|s| (s.record.client_id.as_str(), s))
        .collect();
    type Stored = (Bytes, QoS, Option<(PacketId, OutboundState)>);
    let stored = |name: &str| -> Vec<Stored> {
        sessions.get(name).map_or_else(Vec::new, |s| {
            s.deliveries
                .iter()
                .map(|d| (d.delivery.message.payload.clone(), d.delivery.qos, d.flow))
                .collect()
        })
    };
    let received = |name: &str| -> Vec<(Bytes, Option<PacketId>)> {
        seen.received.get(name).cloned().unwrap_or_default()
    };
    for sub in ["sub1", "sub2"] {
        let stored = stored(sub);
        let received = received(sub);
        for payload in &seen.acked {
            if !stored.iter().any(|(p, _, _)| p == payload)
                && !received.iter().any(|(p, _)| p == payload)
            {
                failures.push(format!("{sub}: acknowledged {payload:?} lost"));
            }
        }
        for (payload, _, _) in &stored {
            if !seen.published.contains(payload) {
                failures.push(format!("{sub}: {payload:?} was never published"));
            }
        }
    }
    // sub2 subscribed at QoS 2.
    let sub2_received = received("sub2");
    let mut once = HashSet::new();
    for (payload, _) in &sub2_received {
        if payload.starts_with(b"q2-") && !once.insert(payload) {
            failures.push(format!("sub2: {payload:?} delivered twice before the cut"));
        }
    }
    let awaiting: HashSet<PacketId> = seen
        .sessions
        .get("sub2")
        .map(|s| s.pending_releases().collect())
        .unwrap_or_default();
    for (payload, qos, flow) in stored("sub2") {
        if qos != QoS::ExactlyOnce {
            continue;
        }
        let Some((_, got_as)) = sub2_received.iter().find(|(p, _)| *p == payload) else {
            continue;
        };
        match flow {
            None => failures.push(format!(
                "sub2: {payload:?}, which the client has, recovered without its flow: it would be \
                 sent again as a new message"
            )),
            Some((pid, state)) => {
                if Some(pid) != *got_as {
                    failures.push(format!(
                        "sub2: {payload:?} came as {got_as:?} and is recovered as {pid:?}"
                    ));
                } else if state != OutboundState::ReleaseSent && !awaiting.contains(&pid) {
                    failures.push(format!(
                        "sub2: {payload:?} recovered as {state:?} though the client completed it: \
                         it would be delivered again"
                    ));
                }
            }
        }
    }
    // pub2 resends every publication it got no PUBREC for; one the broker routed must be
    // recovered as awaiting PUBREL.
    let routed = |payload: &Bytes| {
        recovered.sessions.iter().any(|s| {
            s.deliveries
                .iter()
                .any(|d| d.delivery.message.payload == *payload)
        }) || seen
            .received
            .values()
            .any(|r| r.iter().any(|(p, _)| p == payload))
    };
    let pub2_pending: HashSet<PacketId> = sessions
        .get("pub2")
        .map(|s| s.pending_releases.iter().copied().collect())
        .unwrap_or_default();
    if let Some(session) = seen.sessions.get("pub2") {
        for (pid, flow) in session.in_flight() {
            let payload = &flow.delivery.message.payload;
            if flow.state != OutboundState::ReleaseSent
                && routed(payload)
                && !pub2_pending.contains(&pid)
            {
                failures.push(format!(
                    "pub2: {payload:?} was routed, but its identifier {pid:?} is not recovered as \
                     awaiting PUBREL: the publisher's resend would be routed again"
                ));
            }
        }
    }
    failures
}

/// Every crash point of the scripted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_recovers_what_was_acknowledged() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temporary directory");
    let (total, happened) = run(&dir.path().join("full"), u64::MAX).await;
    assert!(!happened);
    assert!(total > 50, "the scripted run makes only {total} writes");
    for n in 0..total {
        let dir = tempfile::tempdir().expect("temporary directory");
        run(dir.path(), n).await;
    }
    eprintln!("{total} crash points in {:?}", started.elapsed());
}
