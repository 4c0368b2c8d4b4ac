//! The broker embedded in a Rust program: hooks, enhanced authentication, shared-subscription
//! hand-over, access reload and graceful shutdown, exercised through real TCP connections.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mqttd_broker::auth::{Iterations, PasswordFile, ScramClient, ScramClientFinalSent};
use mqttd_broker::{
    Action, Broker, ClientInfo, Config, ConnectAttempt, Hooks, Intercept, ListenerKind, Transport,
    Verdict,
};
use mqttd_client::{connect_tcp, connect_with_auth, AuthFailed, Authenticator, Client, Events};
use mqttd_proto::client::{ClientConfig, Event};
use mqttd_proto::{ClientId, Message, QoS, ReasonCode, TopicFilter, TopicName};
use tokio::net::TcpStream;
use tokio::time::timeout;

mod common;
use common::{next_payload, RecordingStorage, WAIT};

/// After a fence proved the broker handled a packet, how long an answer it wrote (instead of
/// holding it back) gets to reach the client.
const SETTLE: Duration = Duration::from_millis(200);

async fn start(
    mut config: Config,
    hooks: Option<RecordingHooks>,
) -> (Broker, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    config.listen = vec!["tcp://127.0.0.1:0".into()];
    config.data_dir = dir.path().join("data");
    let builder = Broker::builder(config);
    let builder = match hooks {
        Some(h) => builder.hooks(h),
        None => builder,
    };
    let broker = builder.start().await.unwrap();
    let addr = broker.addr(ListenerKind::Tcp).unwrap();
    (broker, addr, dir)
}

fn config(id: &str) -> ClientConfig {
    ClientConfig::new(ClientId::try_from(id).unwrap())
}

async fn client(addr: SocketAddr, id: &str) -> (Client, Events) {
    let (c, e, _) = connect_tcp(addr, config(id), None).await.unwrap();
    (c, e)
}

fn msg(topic: &str, payload: &str, qos: QoS) -> Message {
    Message::new(
        TopicName::try_from(topic).unwrap(),
        payload.as_bytes().to_vec(),
        qos,
        false,
    )
}

fn filter(f: &str) -> TopicFilter {
    TopicFilter::try_from(f).unwrap()
}

/// Fails unless the broker answered the CONNECT with a CONNACK refusing it with `reason`: an
/// I/O error or a connection closed for another reason is not the refusal being tested.
fn assert_refused(
    result: Result<(Client, Events, mqttd_proto::ConnAck), mqttd_client::ConnectError>,
    reason: ReasonCode,
    what: &str,
) {
    match result {
        Err(mqttd_client::ConnectError::Refused(ack)) => assert_eq!(ack.reason, reason, "{what}"),
        Err(other) => panic!("{what}: expected a refusal with {reason}, got {other}"),
        Ok((_, _, ack)) => panic!("{what}: expected a refusal with {reason}, accepted: {ack:?}"),
    }
}

/// The next PUBACK (or other end of a publication) a publisher gets: its payload and reason.
async fn next_delivered(events: &mut Events) -> (String, ReasonCode) {
    loop {
        match timeout(WAIT, events.recv()).await.expect("event in time") {
            Some(Event::Delivered {
                reason, delivery, ..
            }) => {
                let payload = String::from_utf8(delivery.message.payload.to_vec()).unwrap();
                return (payload, reason);
            }
            Some(Event::Closed { reason, .. }) => panic!("closed: {reason}"),
            Some(_) => {}
            None => panic!("connection ended"),
        }
    }
}

#[derive(Clone, Default)]
struct RecordingHooks {
    seen: Arc<Mutex<Vec<(String, Transport)>>>,
}

impl Hooks for RecordingHooks {
    fn authenticate(&self, attempt: &ConnectAttempt<'_>) -> Verdict {
        self.seen
            .lock()
            .unwrap()
            .push((attempt.client_id.to_string(), attempt.peer.transport));
        if attempt.client_id.as_str() == "banned" {
            Verdict::Deny(ReasonCode::Banned)
        } else {
            Verdict::Defer
        }
    }

    fn authorize(&self, client: &ClientInfo, action: Action, topic: &str) -> Verdict {
        if action == Action::Publish && topic.starts_with("secret/") {
            return Verdict::Deny(ReasonCode::NotAuthorized);
        }
        let _ = client;
        Verdict::Defer
    }

    fn on_publish(&self, client: &ClientInfo, message: &mut Message) -> Intercept {
        if message.topic.as_str() == "rewrite" {
            message.payload =
                Bytes::from(format!("{}@{}", client.client_id, client.peer.transport));
        }
        if message.topic.as_str() == "drop" {
            return Intercept::Drop(ReasonCode::ImplementationSpecificError);
        }
        Intercept::Continue
    }
}

#[tokio::test]
async fn hooks_see_the_transport_and_can_refuse_rewrite_and_drop() {
    let hooks = RecordingHooks::default();
    let (broker, addr, _dir) = start(Config::default(), Some(hooks.clone())).await;
    let (sub, mut events) = client(addr, "watcher").await;
    sub.subscribe_one(filter("#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let (publisher, mut pub_events) = client(addr, "writer").await;

    let _ = publisher
        .publish(msg("secret/x", "no", QoS::AtLeastOnce))
        .await
        .unwrap();
    let _ = publisher
        .publish(msg("drop", "no", QoS::AtLeastOnce))
        .await
        .unwrap();
    let _ = publisher
        .publish(msg("rewrite", "original", QoS::AtLeastOnce))
        .await
        .unwrap();
    assert_eq!(next_payload(&mut events).await, "writer@tcp");

    let mut reasons = Vec::new();
    while reasons.len() < 3 {
        if let Event::Delivered { reason, .. } =
            timeout(WAIT, pub_events.recv()).await.unwrap().unwrap()
        {
            reasons.push(reason);
        }
    }
    assert_eq!(
        reasons,
        [
            ReasonCode::NotAuthorized,
            ReasonCode::ImplementationSpecificError,
            ReasonCode::Success
        ]
    );

    let refused = connect_tcp(addr, config("banned"), None).await;
    match refused {
        Err(mqttd_client::ConnectError::Refused(ack)) => assert_eq!(ack.reason, ReasonCode::Banned),
        other => panic!("expected a refusal, got {:?}", other.map(|r| r.2)),
    }
    let seen = hooks.seen.lock().unwrap().clone();
    assert!(
        seen.contains(&("writer".to_owned(), Transport::Tcp)),
        "{seen:?}"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn shutdown_sends_server_shutting_down_to_mqtt5_clients() {
    let (broker, addr, _dir) = start(Config::default(), None).await;
    let (_c, mut events) = client(addr, "v5").await;
    let shutdown = tokio::spawn(broker.shutdown());
    let closed = loop {
        match timeout(WAIT, events.recv()).await.unwrap() {
            Some(Event::Closed { reason, by_server }) => break (reason, by_server),
            Some(_) => {}
            None => panic!("connection ended without a Closed event"),
        }
    };
    assert_eq!(closed, (ReasonCode::ServerShuttingDown, true));
    timeout(WAIT, shutdown).await.unwrap().unwrap();
    match TcpStream::connect(addr).await {
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "listener closed after shutdown: {e}"
        ),
        Ok(_) => panic!("listener still accepting after shutdown"),
    }
}

/// SCRAM-SHA-256 on the client side, driven by the broker's own client state machine.
struct Scram {
    user: String,
    password: String,
    first: Option<ScramClient>,
    last: Option<ScramClientFinalSent>,
}

impl Scram {
    fn new(user: &str, password: &str) -> Self {
        Self {
            user: user.into(),
            password: password.into(),
            first: None,
            last: None,
        }
    }
}

impl Authenticator for Scram {
    fn method(&self) -> &str {
        "SCRAM-SHA-256"
    }

    fn start(&mut self) -> Result<Option<Bytes>, AuthFailed> {
        let (state, first) = ScramClient::new(&self.user, self.password.as_bytes())
            .map_err(|e| AuthFailed(e.to_string()))?;
        self.first = Some(state);
        Ok(Some(first.into()))
    }

    fn challenge(&mut self, data: Option<Bytes>) -> Result<Option<Bytes>, AuthFailed> {
        let state = self
            .first
            .take()
            .ok_or_else(|| AuthFailed("unexpected challenge".into()))?;
        let (next, reply) = state
            .handle_server_first(data.as_deref().unwrap_or_default())
            .map_err(|e| AuthFailed(e.to_string()))?;
        self.last = Some(next);
        Ok(Some(reply.into()))
    }

    fn finish(&mut self, data: Option<Bytes>) -> Result<(), AuthFailed> {
        let state = self
            .last
            .take()
            .ok_or_else(|| AuthFailed("no exchange".into()))?;
        state
            .verify_server_final(data.as_deref().unwrap_or_default())
            .map_err(|e| AuthFailed(e.to_string()))
    }
}

fn password_file(dir: &std::path::Path, user: &str, password: &str) -> std::path::PathBuf {
    let path = dir.join("passwords");
    let mut file = if path.exists() {
        PasswordFile::load(&path).unwrap()
    } else {
        PasswordFile::new()
    };
    file.set_password(user, password.as_bytes(), Iterations::MIN)
        .unwrap();
    file.save(&path).unwrap();
    path
}

#[tokio::test]
async fn scram_sha_256_connect_reauthenticate_and_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.password_file = Some(password_file(dir.path(), "alice", "wonderland"));
    let (broker, addr, _data) = start(config, None).await;

    let stream = TcpStream::connect(addr).await.unwrap();
    let auth = Box::new(Scram::new("alice", "wonderland"));
    let (c, mut events, ack) = connect_with_auth(stream, config_v5("scram"), None, Some(auth))
        .await
        .unwrap();
    assert_eq!(ack.reason, ReasonCode::Success);
    assert_eq!(
        ack.properties.authentication_method.as_deref(),
        Some("SCRAM-SHA-256")
    );

    // Re-authentication while the connection keeps working.
    c.subscribe_one(filter("t"), QoS::AtLeastOnce)
        .await
        .unwrap();
    c.reauthenticate().await.unwrap();
    loop {
        match timeout(WAIT, events.recv()).await.unwrap().unwrap() {
            Event::ReAuthenticated { .. } => break,
            Event::Closed { reason, .. } => panic!("closed during re-authentication: {reason}"),
            _ => {}
        }
    }
    let _ = c
        .publish(msg("t", "after reauth", QoS::AtLeastOnce))
        .await
        .unwrap();
    assert_eq!(next_payload(&mut events).await, "after reauth");

    // A wrong password is refused with 0x86, and so is an unknown user.
    for (user, password) in [("alice", "looking-glass"), ("mallory", "x")] {
        let stream = TcpStream::connect(addr).await.unwrap();
        let auth = Box::new(Scram::new(user, password));
        match connect_with_auth(stream, config_v5("bad"), None, Some(auth)).await {
            Err(mqttd_client::ConnectError::Refused(ack)) => {
                assert_eq!(ack.reason, ReasonCode::BadUserNameOrPassword, "{user}")
            }
            other => panic!("{user}: expected refusal, got {:?}", other.map(|r| r.2)),
        }
    }
    // Plain user name and password against the same file.
    let mut plain = config_v5("plain");
    plain.username = Some("alice".try_into().unwrap());
    plain.password = Some(Bytes::from_static(b"wonderland"));
    connect_tcp(addr, plain.clone(), None).await.unwrap();
    plain.password = Some(Bytes::from_static(b"nope"));
    assert_refused(
        connect_tcp(addr, plain, None).await,
        ReasonCode::BadUserNameOrPassword,
        "plain login with a wrong password",
    );
    broker.shutdown().await;
}

fn config_v5(id: &str) -> ClientConfig {
    config(id)
}

#[tokio::test]
async fn reloading_access_applies_a_changed_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = password_file(dir.path(), "bob", "one");
    let mut broker_config = Config::default();
    broker_config.password_file = Some(path.clone());
    let (broker, addr, _data) = start(broker_config, None).await;
    let mut cfg = config("bob");
    cfg.username = Some("bob".try_into().unwrap());
    cfg.password = Some(Bytes::from_static(b"two"));
    assert_refused(
        connect_tcp(addr, cfg.clone(), None).await,
        ReasonCode::BadUserNameOrPassword,
        "the new password before it is in the file",
    );
    password_file(dir.path(), "bob", "two");
    assert_refused(
        connect_tcp(addr, cfg.clone(), None).await,
        ReasonCode::BadUserNameOrPassword,
        "the new password in the file, not before the reload",
    );
    broker.reload_access().unwrap();
    connect_tcp(addr, cfg, None).await.unwrap();
    broker.shutdown().await;
}

#[tokio::test]
async fn shared_subscription_messages_move_to_another_member_when_a_session_ends() {
    let (broker, addr, _dir) = start(Config::default(), None).await;
    let mut slow_cfg = config("slow");
    slow_cfg.auto_ack = false;
    let (slow, mut slow_events, _) = connect_tcp(addr, slow_cfg, None).await.unwrap();
    slow.subscribe_one(filter("$share/g/jobs"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let (publisher, _pe) = client(addr, "producer").await;
    // With one member, the job goes to the slow member, which never acknowledges it.
    let _ = publisher
        .publish(msg("jobs", "job-1", QoS::AtLeastOnce))
        .await
        .unwrap();
    assert_eq!(next_payload(&mut slow_events).await, "job-1");
    let (fast, mut fast_events) = client(addr, "fast").await;
    fast.subscribe_one(filter("$share/g/jobs"), QoS::AtLeastOnce)
        .await
        .unwrap();
    // The slow member's clean session ends: its unacknowledged job goes to the other member.
    slow.disconnect(ReasonCode::Success, None).await.unwrap();
    assert_eq!(next_payload(&mut fast_events).await, "job-1");
    broker.shutdown().await;
}

#[tokio::test]
async fn no_retained_messages_for_shared_subscriptions_but_for_plain_ones() {
    let (broker, addr, _dir) = start(Config::default(), None).await;
    let (publisher, mut pub_events) = client(addr, "p").await;
    let mut retained = msg("r/t", "kept", QoS::AtLeastOnce);
    retained.retain = true;
    let _ = publisher.publish(retained).await.unwrap();
    // Acknowledged: the retained message is set before anyone subscribes.
    assert_eq!(
        next_delivered(&mut pub_events).await,
        ("kept".to_owned(), ReasonCode::NoMatchingSubscribers)
    );
    let (c, mut events) = client(addr, "s").await;
    c.subscribe_one(filter("$share/g/r/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    c.subscribe_one(filter("r/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let first = timeout(WAIT, events.next_message()).await.unwrap().unwrap();
    assert!(
        first.message.retain,
        "delivered because of the plain subscription, RETAIN set"
    );
    // A marker published now reaches the session after any retained copy its subscriptions
    // produced: everything before it is all there is.
    let _ = publisher
        .publish(msg("r/end", "end", QoS::AtLeastOnce))
        .await
        .unwrap();
    let mut before_marker = Vec::new();
    loop {
        let m = timeout(WAIT, events.next_message()).await.unwrap().unwrap();
        if m.message.payload == "end" {
            assert!(!m.message.retain);
            break;
        }
        before_marker.push(m.message.payload);
    }
    assert!(
        before_marker.is_empty(),
        "exactly one copy: none for the shared subscription, got {before_marker:?} as well"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn storage_is_recovered_told_of_changes_and_synced_before_acknowledging() {
    let mut retained = Message::new(
        TopicName::try_from("kept/t").unwrap(),
        b"old".to_vec(),
        QoS::AtLeastOnce,
        true,
    );
    retained.retain = true;
    let storage = RecordingStorage::recovering(
        vec![Arc::new(retained)],
        vec![mqttd_broker::storage::StoredSession {
            record: mqttd_broker::storage::SessionRecord {
                client_id: ClientId::try_from("sleeper").unwrap(),
                expiry_interval: 3600,
                subscriptions: vec![(
                    filter("news/#"),
                    mqttd_proto::SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    },
                    None,
                )],
                will: None,
                disconnected_at: None,
            },
            deliveries: Vec::new(),
            pending_releases: Vec::new(),
        }],
    );
    // Nothing is durable until the test says so.
    storage.hold();
    let dir = tempfile::tempdir().unwrap();
    let mut broker_config = Config::default();
    broker_config.listen = vec!["tcp://127.0.0.1:0".into()];
    broker_config.data_dir = dir.path().to_owned();
    let broker = Broker::builder(broker_config)
        .storage(storage.clone())
        .start()
        .await
        .unwrap();
    let addr = broker.addr(ListenerKind::Tcp).unwrap();

    // The recovered retained message is there for a new subscriber.
    let (watcher, mut watcher_events) = client(addr, "watcher").await;
    watcher
        .subscribe_one(filter("kept/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(next_payload(&mut watcher_events).await, "old");

    // A QoS 1 message routed to the recovered session is stored, and not acknowledged before
    // that is durable.
    let (publisher, mut pub_events) = client(addr, "writer").await;
    let _ = publisher
        .publish(msg("news/1", "queued", QoS::AtLeastOnce))
        .await
        .unwrap();
    storage.saw(0, |l| l == "store sleeper news/1").await;
    // Fence: once the next publication is stored too, the connection has read past the first
    // one, and so has written its PUBACK unless that waits for storage.
    let _ = publisher
        .publish(msg("news/fence", "fence 1", QoS::AtLeastOnce))
        .await
        .unwrap();
    storage.saw(0, |l| l == "store sleeper news/fence").await;
    let early = timeout(SETTLE, pub_events.recv()).await;
    assert!(
        early.is_err(),
        "PUBACK before the storage synced: {early:?}"
    );
    storage.sync_held();
    for expected in ["queued", "fence 1"] {
        assert_eq!(
            next_delivered(&mut pub_events).await,
            (expected.to_owned(), ReasonCode::Success)
        );
    }

    // Retained changes reach the storage, and are acknowledged once durable.
    let mark = storage.mark();
    let mut r = msg("kept/t", "", QoS::AtLeastOnce);
    r.retain = true;
    let _ = publisher.publish(r).await.unwrap();
    storage.saw(mark, |l| l == "retain kept/t").await;
    let _ = publisher
        .publish(msg("news/fence", "fence 2", QoS::AtLeastOnce))
        .await
        .unwrap();
    storage.saw(mark, |l| l == "store sleeper news/fence").await;
    let early = timeout(SETTLE, pub_events.recv()).await;
    assert!(
        early.is_err(),
        "PUBACK before the retained message was durable: {early:?}"
    );
    storage.sync_held();
    for expected in ["", "fence 2"] {
        assert_eq!(
            next_delivered(&mut pub_events).await,
            (expected.to_owned(), ReasonCode::Success)
        );
    }
    let log = storage.log();
    assert!(log.contains(&"retain kept/t".to_owned()), "{log:?}");
    assert!(log.contains(&"store sleeper news/1".to_owned()), "{log:?}");
    // The recovered session resumes with its subscription and the queued message, which goes
    // out once storage has made the resumption durable.
    let releaser = {
        let storage = storage.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                storage.sync_held();
            }
        })
    };
    let mut cfg = config("sleeper");
    cfg.clean_start = false;
    cfg.session_expiry_interval = 3600;
    let (_sleeper, mut sleeper_events, ack) = connect_tcp(addr, cfg, None).await.unwrap();
    assert!(ack.session_present);
    for expected in ["queued", "fence 1", "fence 2"] {
        assert_eq!(next_payload(&mut sleeper_events).await, expected);
    }

    releaser.abort();
    let log = storage.log();
    assert!(log.iter().any(|l| l.starts_with("save sleeper")), "{log:?}");
    broker.shutdown().await;
}

/// QoS 1 publishers faster than their subscriber are slowed down, not acknowledged and then
/// dropped: with a subscriber queue of 20 messages, 4 × 2,000 messages published as fast as the
/// client library sends are all acknowledged, and each reaches the subscriber exactly once or is
/// counted as dropped; none is lost silently.
///
/// The broker drops a message for a subscriber that made no progress for 25 ms
/// (`BACKPRESSURE_WAIT`), as it must for one that stopped reading. On a loaded machine the whole
/// test process can be descheduled that long while the subscriber is reading, so "no drop at all"
/// is asserted only for a run in which no task of the test's runtime waited more than a fifth of
/// that to be polled (a ticker measures it); otherwise the run only reports the drops.
#[tokio::test]
async fn qos1_publishers_wait_for_a_slow_subscriber_instead_of_losing_messages() {
    publishers_outpace_a_slow_subscriber(Outpaced {
        qos: QoS::AtLeastOnce,
        publishers: 4,
        each: 2_000,
        persistent: false,
        topic: "fan",
        quiet: Duration::from_millis(5),
    })
    .await;
}

/// QoS 2 publishers faster than their subscriber wait as QoS 1 ones do: with a persistent
/// subscriber (its messages stored before they are acknowledged) whose queue takes 20 messages,
/// 2 × 1,000 QoS 2 messages published as fast as the client library sends are all completed,
/// each reaches the subscriber exactly once, and none is dropped.
///
/// As in the QoS 1 test above, "no drop at all" is asserted only for a run in which no task of
/// the test's runtime waited more than half of `BACKPRESSURE_WAIT` (250 ms) to be polled;
/// otherwise each message must still be received once or counted as dropped.
#[tokio::test]
async fn qos2_publishers_wait_for_a_slow_persistent_subscriber_and_drop_nothing() {
    publishers_outpace_a_slow_subscriber(Outpaced {
        qos: QoS::ExactlyOnce,
        publishers: 2,
        each: 1_000,
        persistent: true,
        topic: "fan2",
        quiet: Duration::from_millis(125),
    })
    .await;
}

/// The shape of [`publishers_outpace_a_slow_subscriber`]'s run.
struct Outpaced {
    qos: QoS,
    publishers: usize,
    each: usize,
    /// A persistent subscriber session (the broker stores its messages before acknowledging).
    persistent: bool,
    /// The topic prefix (and the clients' names).
    topic: &'static str,
    /// The longest stall of the test's own runtime under which no drop is allowed at all.
    quiet: Duration,
}

/// `publishers` clients publish `each` messages of `qos` as fast as the client library sends to
/// one subscriber that reads with a receive maximum of 5 through a queue of 20: every
/// publication completes, each message reaches the subscriber once or is counted as dropped,
/// none twice, and none is dropped unless the test's runtime itself stalled longer than `quiet`
/// (a ticker measures that).
async fn publishers_outpace_a_slow_subscriber(run: Outpaced) {
    let Outpaced {
        qos,
        publishers,
        each,
        persistent,
        topic,
        quiet,
    } = run;
    let mut broker_config = Config::default();
    broker_config.max_queued_messages = 20;
    broker_config.max_inflight_messages = 5;
    let (broker, addr, _dir) = start(broker_config, None).await;
    let mut sub_config = config(&format!("{topic}-slow"));
    sub_config.receive_maximum = 5;
    if persistent {
        sub_config.session_expiry_interval = 3600;
    }
    let (sub, mut sub_events, _) = connect_tcp(addr, sub_config, None).await.unwrap();
    sub.subscribe_one(filter(&format!("{topic}/#")), qos)
        .await
        .unwrap();

    let longest_gap = Arc::new(Mutex::new(Duration::ZERO));
    let ticker = {
        let longest_gap = longest_gap.clone();
        tokio::spawn(async move {
            const TICK: Duration = Duration::from_millis(1);
            let mut last = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(TICK).await;
                let now = tokio::time::Instant::now();
                let gap = now.saturating_duration_since(last).saturating_sub(TICK);
                let mut longest = longest_gap.lock().unwrap();
                *longest = (*longest).max(gap);
                drop(longest);
                last = now;
            }
        })
    };

    let total = (publishers * each) as u64;
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (publisher, mut events) = client(addr, &format!("{topic}-fast-{p}")).await;
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                let m = msg(&format!("{topic}/{p}"), &format!("{p}-{i}"), qos);
                publisher.publish_nowait(Arc::new(m)).await.unwrap();
            }
            let mut completed = 0;
            while completed < each {
                match timeout(WAIT, events.recv()).await {
                    Ok(Some(Event::Delivered { reason, .. })) => {
                        assert!(!reason.is_error(), "{reason}");
                        completed += 1;
                    }
                    Ok(Some(_)) => {}
                    other => panic!("publisher {p}: {completed} of {each} completed: {other:?}"),
                }
            }
            publisher
        }));
    }
    // Every message is accounted for once it was received or counted as dropped; the drop
    // counter moves when the broker drops, so waiting for the sum needs no quiet window.
    let dropped = || broker.metrics().messages_dropped.get();
    let mut received = std::collections::HashSet::new();
    let mut duplicates = 0;
    timeout(WAIT, async {
        while received.len() as u64 + dropped() < total {
            if let Ok(m) = timeout(Duration::from_millis(50), sub_events.next_message()).await {
                if !received.insert(m.expect("open").message.payload) {
                    duplicates += 1;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{} received + {} dropped of {total}: messages lost",
            received.len(),
            dropped()
        )
    });
    for t in tasks {
        t.await.unwrap();
    }
    ticker.abort();
    let longest_gap = *longest_gap.lock().unwrap();
    let dropped = dropped();
    assert_eq!(duplicates, 0, "messages delivered twice");
    assert_eq!(received.len() as u64 + dropped, total);
    eprintln!("longest scheduling gap {longest_gap:?}, {dropped} dropped");
    if longest_gap < quiet {
        assert_eq!(
            dropped, 0,
            "messages dropped for a subscriber that was reading"
        );
    }
    broker.shutdown().await;
}
