//! Password checks (PBKDF2, milliseconds of CPU each) run off the runtime's worker threads,
//! at most `verification_limit()` at once, so that a flood of CONNECTs with wrong passwords
//! cannot stall the connections that share a worker with them.
//!
//! The test runs the broker on a current-thread runtime: its only worker is the test's own
//! thread, so a check that ran on a worker would run on that thread. A hook sees every
//! check (hooks are consulted with the password file, in the same turn) and records where it
//! ran and how many ran at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use bytes::Bytes;
use mqttd_broker::auth::{verification_limit, Iterations, PasswordFile};
use mqttd_broker::{Broker, Config, ConnectAttempt, Hooks, ListenerKind, Verdict};
use mqttd_client::{connect_tcp, ConnectError};
use mqttd_proto::client::ClientConfig;
use mqttd_proto::{ClientId, ReasonCode};
use tokio::task::JoinSet;

/// Wrong-password CONNECTs sent at once.
const FLOOD: usize = 50;
/// Generous: only a hang reaches it.
const WAIT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Probe {
    /// Threads the checks ran on.
    threads: Mutex<Vec<ThreadId>>,
    running: AtomicUsize,
    most: AtomicUsize,
}

struct Recording(Arc<Probe>);

impl Hooks for Recording {
    fn authenticate(&self, _: &ConnectAttempt<'_>) -> Verdict {
        let p = &self.0;
        p.threads.lock().unwrap().push(std::thread::current().id());
        let now = p.running.fetch_add(1, Ordering::SeqCst) + 1;
        p.most.fetch_max(now, Ordering::SeqCst);
        // Long enough for checks to overlap if nothing limits them.
        std::thread::sleep(Duration::from_millis(20));
        p.running.fetch_sub(1, Ordering::SeqCst);
        Verdict::Defer
    }
}

fn client(id: &str, password: &'static [u8]) -> ClientConfig {
    let mut config = ClientConfig::new(ClientId::try_from(id).unwrap());
    config.username = Some("alice".try_into().unwrap());
    config.password = Some(Bytes::from_static(password));
    config.connect_timeout = WAIT;
    config
}

#[tokio::test]
async fn password_checks_run_off_the_runtime_and_at_most_the_limit_at_once() {
    let worker = std::thread::current().id();
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwords");
    let mut file = PasswordFile::new();
    file.set_password("alice", b"right", Iterations::MIN)
        .unwrap();
    file.save(&passwords).unwrap();
    let mut config = Config::default();
    config.listen = vec!["tcp://127.0.0.1:0".into()];
    config.data_dir = dir.path().join("data");
    config.persistence = false;
    config.password_file = Some(passwords);
    // The flood waits for turns: far from the CONNECT deadline.
    config.connect_timeout = 60;
    let probe = Arc::new(Probe::default());
    let broker = Broker::builder(config)
        .hooks(Recording(probe.clone()))
        .start()
        .await
        .unwrap();
    let addr = broker.addr(ListenerKind::Tcp).unwrap();

    let mut flood = JoinSet::new();
    for i in 0..FLOOD {
        flood.spawn(connect_tcp(
            addr,
            client(&format!("wrong-{i}"), b"wrong"),
            None,
        ));
    }
    let results = tokio::time::timeout(WAIT, flood.join_all())
        .await
        .expect("every CONNECT is answered");
    for result in results {
        match result {
            Err(ConnectError::Refused(ack)) => {
                assert_eq!(ack.reason, ReasonCode::BadUserNameOrPassword)
            }
            Err(other) => panic!("expected a refusal, got {other}"),
            Ok(_) => panic!("a wrong password was accepted"),
        }
    }
    // The right password still gets in, through the same path.
    let (alice, _events, _) = connect_tcp(addr, client("alice", b"right"), None)
        .await
        .expect("the right password is accepted");
    drop(alice);

    let threads = probe.threads.lock().unwrap().clone();
    assert_eq!(threads.len(), FLOOD + 1, "every check was seen");
    assert!(
        threads.iter().all(|t| *t != worker),
        "a password check ran on the runtime's worker thread"
    );
    let most = probe.most.load(Ordering::SeqCst);
    assert!(
        most <= verification_limit(),
        "{most} checks ran at once; the limit is {}",
        verification_limit()
    );
    broker.shutdown().await;
}
