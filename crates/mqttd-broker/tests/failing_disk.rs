//! A data directory on a small filesystem that fills up: the broker refuses publications it
//! cannot store (the publisher's connection closes, with DISCONNECT 0x80 under MQTT 5) rather
//! than acknowledge them, clean-session traffic goes on meanwhile, and once there is room again
//! the broker acknowledges persistent publications again by itself. After a restart, every
//! acknowledged message is delivered.
//!
//! The filesystem is a tmpfs with a size limit, mounted by the test: it needs root. Without
//! root the test says so and passes, unless `MQTTD_REQUIRE_ROOT_TESTS=1`, which makes it fail
//! (CI runs as root and sets it).

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mqttd_broker::{Broker, Config, ListenerKind};
use mqttd_client::{connect_tcp, Client, Events};
use mqttd_proto::client::{ClientConfig, Event};
use mqttd_proto::{ClientId, Message, ProtocolVersion, QoS, ReasonCode, TopicFilter, TopicName};
use tokio::time::timeout;

/// How long any one step may take: only a hang reaches it.
const WAIT: Duration = Duration::from_secs(30);
/// Each stored message's payload: a few fill the last megabyte quickly.
const PAYLOAD: usize = 8 * 1024;

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Whether the test can run; fails if it must and cannot.
fn can_mount(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var("MQTTD_REQUIRE_ROOT_TESTS").as_deref() != Ok("1"),
        "{what}: needs root to mount a tmpfs, and MQTTD_REQUIRE_ROOT_TESTS=1"
    );
    eprintln!("SKIPPED {what}: needs root to mount a tmpfs (set MQTTD_REQUIRE_ROOT_TESTS=1 to fail instead)");
    false
}

/// A tmpfs of `size` mounted on a temporary directory, unmounted when dropped.
struct Tmpfs {
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mount)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs: {status}");
        Self { mount, _dir: dir }
    }

    /// Fills the filesystem with `path` until it is full, then gives back `room` bytes.
    fn fill(&self, path: &Path, room: u64) {
        let mut f = std::fs::File::create(path).expect("create the filler");
        let chunk = vec![0x5a_u8; 64 * 1024];
        let mut len = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => len += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        f.set_len(len.saturating_sub(room)).expect("give room back");
        f.sync_all().expect("sync the filler");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

async fn start(data_dir: &Path) -> (Broker, SocketAddr) {
    try_start(data_dir).await.expect("start the broker")
}

async fn try_start(data_dir: &Path) -> Result<(Broker, SocketAddr), String> {
    let mut config = Config::default();
    config.listen = vec!["tcp://127.0.0.1:0".into()];
    config.data_dir = data_dir.to_path_buf();
    config.allow_anonymous = Some(true);
    config.persistence = true;
    config.max_queued_messages = 100_000;
    config.max_queued_bytes = 0;
    let broker = Broker::builder(config)
        .start()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let addr = broker.addr(ListenerKind::Tcp).expect("a TCP listener");
    Ok((broker, addr))
}

fn client_config(id: &str, clean: bool, version: ProtocolVersion) -> ClientConfig {
    let mut c = ClientConfig::new(ClientId::try_from(id).expect("client id"));
    c.clean_start = clean;
    c.version = version;
    if !clean {
        c.session_expiry_interval = u32::MAX;
    }
    c
}

async fn connect(addr: SocketAddr, config: ClientConfig) -> (Client, Events) {
    let (c, e, _) = timeout(WAIT, connect_tcp(addr, config, None))
        .await
        .expect("connect in time")
        .expect("connect");
    (c, e)
}

fn message(topic: &str, payload: Vec<u8>) -> Message {
    Message::new(
        TopicName::try_from(topic).expect("topic"),
        payload,
        QoS::AtLeastOnce,
        false,
    )
}

/// A stored message's payload: its number, then bytes that do not compress (the store's
/// journal compresses what it can).
fn payload(n: u32) -> Vec<u8> {
    let mut p = n.to_be_bytes().to_vec();
    let mut x = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while p.len() < PAYLOAD {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p.extend_from_slice(&x.to_le_bytes());
    }
    p.truncate(PAYLOAD);
    p
}

/// How one QoS 1 publication ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// PUBACK with this reason code.
    Acked(ReasonCode),
    /// The connection closed first, with this reason.
    Closed(ReasonCode),
}

/// Publishes `message` at QoS 1 and waits for its PUBACK or the end of the connection.
async fn publish(client: &Client, events: &mut Events, message: Message) -> Outcome {
    if client.publish(message).await.is_err() {
        return Outcome::Closed(ReasonCode::UnspecifiedError);
    }
    loop {
        match timeout(WAIT, events.recv())
            .await
            .expect("an answer in time")
        {
            Some(Event::Delivered { reason, .. }) => return Outcome::Acked(reason),
            Some(Event::Closed { reason, .. }) => return Outcome::Closed(reason),
            Some(_) => {}
            None => return Outcome::Closed(ReasonCode::UnspecifiedError),
        }
    }
}

async fn subscribe(client: &Client, filter: &str) {
    let ack = timeout(
        WAIT,
        client.subscribe_one(
            TopicFilter::try_from(filter).expect("filter"),
            QoS::AtLeastOnce,
        ),
    )
    .await
    .expect("SUBACK in time")
    .expect("subscribed");
    let _ = ack;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_what_it_cannot_store_and_recovers_by_itself() {
    if !can_mount("failing_disk") {
        return;
    }
    let fs = Tmpfs::mount("16m");
    let data_dir = fs.mount.join("data");
    let (broker, addr) = start(&data_dir).await;
    let started = Instant::now();

    // A persistent subscriber, offline: what is published to it is stored.
    let (sub, _sub_events) =
        connect(addr, client_config("keeper", false, ProtocolVersion::V5)).await;
    subscribe(&sub, "t/#").await;
    let _ = sub.disconnect(ReasonCode::Success, None).await;
    // A clean-session pair, which needs no storage.
    let (clean_sub, mut clean_events) =
        connect(addr, client_config("clean-sub", true, ProtocolVersion::V5)).await;
    subscribe(&clean_sub, "c/#").await;

    // Room for a few hundred kilobytes more.
    let filler = fs.mount.join("filler");
    fs.fill(&filler, 512 * 1024);

    let mut acked = BTreeSet::new();
    let mut refused = 0u32;
    let mut n = 0u32;
    let (mut publisher, mut events) =
        connect(addr, client_config("pub", true, ProtocolVersion::V5)).await;
    // Publish until the broker refuses one: at most what would fill the tmpfs many times.
    while refused == 0 {
        n += 1;
        assert!(n < 20_000, "the disk never filled");
        assert!(
            started.elapsed() < 4 * WAIT,
            "the disk never filled in time"
        );
        match publish(
            &publisher,
            &mut events,
            message(&format!("t/{n}"), payload(n)),
        )
        .await
        {
            Outcome::Acked(ReasonCode::Success) => {
                acked.insert(n);
            }
            Outcome::Acked(reason) => {
                assert!(
                    [ReasonCode::QuotaExceeded, ReasonCode::UnspecifiedError].contains(&reason),
                    "refused with {reason}"
                );
                refused += 1;
            }
            Outcome::Closed(reason) => {
                assert_eq!(reason, ReasonCode::UnspecifiedError, "closed with {reason}");
                refused += 1;
            }
        }
    }
    assert!(
        !acked.is_empty(),
        "something was stored before the disk filled"
    );

    // Clean-session traffic goes on: QoS 1 between clean sessions is acknowledged and
    // delivered while the disk is full.
    let (clean_pub, mut clean_pub_events) =
        connect(addr, client_config("clean-pub", true, ProtocolVersion::V5)).await;
    for i in 0..10u32 {
        let outcome = publish(
            &clean_pub,
            &mut clean_pub_events,
            message(&format!("c/{i}"), i.to_be_bytes().to_vec()),
        )
        .await;
        assert_eq!(
            outcome,
            Outcome::Acked(ReasonCode::Success),
            "clean message {i}"
        );
    }
    let mut clean_received = 0;
    while clean_received < 10 {
        match timeout(WAIT, clean_events.recv())
            .await
            .expect("clean delivery in time")
        {
            Some(Event::Publish(_)) => clean_received += 1,
            Some(Event::Closed { reason, .. }) => panic!("clean subscriber closed: {reason}"),
            Some(_) => {}
            None => panic!("clean subscriber ended"),
        }
    }

    // MQTT 3.1.1 has no failure PUBACK: a persistent publication the broker cannot store
    // closes the connection, and is never acknowledged.
    let (old, mut old_events) = connect(
        addr,
        client_config("pub-311", true, ProtocolVersion::V3_1_1),
    )
    .await;
    n += 1;
    match publish(
        &old,
        &mut old_events,
        message(&format!("t/{n}"), payload(n)),
    )
    .await
    {
        Outcome::Closed(_) => refused += 1,
        Outcome::Acked(reason) => panic!("a 3.1.1 publication on a full disk ended with {reason}"),
    }

    let errors = broker.metrics().render();
    assert!(
        errors
            .lines()
            .any(|l| l.starts_with("mqttd_store_errors_total{op=") && !l.ends_with(" 0")),
        "the failure is counted:\n{}",
        errors
            .lines()
            .filter(|l| l.contains("store_errors"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Room again: the broker acknowledges persistent publications by itself, no restart.
    std::fs::remove_file(&filler).expect("remove the filler");
    let deadline = Instant::now() + WAIT;
    let mut resumed = 0;
    while resumed < 5 {
        assert!(
            Instant::now() < deadline,
            "the broker did not resume in time"
        );
        n += 1;
        match publish(
            &publisher,
            &mut events,
            message(&format!("t/{n}"), payload(n)),
        )
        .await
        {
            Outcome::Acked(ReasonCode::Success) => {
                acked.insert(n);
                resumed += 1;
            }
            Outcome::Acked(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Outcome::Closed(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                (publisher, events) =
                    connect(addr, client_config("pub", true, ProtocolVersion::V5)).await;
            }
        }
    }
    assert!(refused >= 2, "refusals: {refused}");
    drop((publisher, old, clean_pub, clean_sub, sub));
    drop((
        events,
        old_events,
        clean_pub_events,
        clean_events,
        _sub_events,
    ));
    eprintln!(
        "{:?}: {} acknowledged, {refused} refused; shutting down",
        started.elapsed(),
        acked.len()
    );
    timeout(WAIT, broker.shutdown())
        .await
        .expect("shut down in time");

    // After a restart the subscriber gets every message that was acknowledged. The store
    // engine locks its directory for the life of the process's handle, which the first
    // broker's leftover tasks may keep: the second broker runs on a copy of what the first
    // left behind once it shut down.
    let copy = tempfile::tempdir().expect("temporary directory");
    let status = Command::new("cp")
        .arg("-a")
        .arg(&data_dir)
        .arg(copy.path().join("data"))
        .status()
        .expect("run cp");
    assert!(status.success(), "copy the data directory: {status}");
    let (broker, addr) = start(&copy.path().join("data")).await;
    let (_keeper, mut keeper_events) =
        connect(addr, client_config("keeper", false, ProtocolVersion::V5)).await;
    let mut received = BTreeSet::new();
    while !acked.is_subset(&received) {
        match timeout(WAIT, keeper_events.recv()).await {
            Ok(Some(Event::Publish(p))) => {
                let id = p
                    .message
                    .payload
                    .get(..4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_be_bytes)
                    .expect("a numbered payload");
                received.insert(id);
            }
            Ok(Some(Event::Closed { reason, .. })) => panic!("subscriber closed: {reason}"),
            Ok(Some(_)) => {}
            Ok(None) => panic!("subscriber ended"),
            Err(_) => {
                let missing: Vec<_> = acked.difference(&received).collect();
                panic!(
                    "{} acknowledged message(s) never delivered after the restart: {missing:?}",
                    missing.len()
                );
            }
        }
    }
    broker.shutdown().await;
}
