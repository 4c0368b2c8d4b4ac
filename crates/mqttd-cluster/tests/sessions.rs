//! Persistent sessions across a 3-node cluster in one process: a message published on one
//! node is enqueued through Raft, by group commit, for a session another node owns, and the
//! owner is told to deliver it; a takeover tells the old owner it lost the session.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use mqttd_cluster::session::{EnqueueResult, MessageId, Step, StoredMessage, SubscriptionOptions};
use mqttd_cluster::{
    ApplyHook, ClusterNode, Command, Effect, Member, NodeId, Outcome, Proposer, Rejection, Settled,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod support;

use support::{claim, eventually, options, retry, Ca};

/// Collects what a node is told to act on.
#[derive(Default)]
struct Told(Mutex<Vec<Effect>>);

impl ApplyHook for Told {
    fn applied(&self, effects: Vec<Effect>) {
        self.0.lock().unwrap().extend(effects);
    }
}

impl Told {
    fn take(&self) -> Vec<Effect> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_on_one_node_is_queued_for_a_session_owned_by_another() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut nodes: BTreeMap<NodeId, Arc<ClusterNode>> = BTreeMap::new();
    let mut told: BTreeMap<NodeId, Arc<Told>> = BTreeMap::new();
    for id in 1..=3 {
        let node = ClusterNode::start(options(&ca, dir.path(), id, any))
            .await
            .unwrap();
        let hook = Arc::new(Told::default());
        node.on_apply(hook.clone());
        told.insert(id, hook);
        nodes.insert(id, Arc::new(node));
    }
    let members: BTreeMap<NodeId, Member> = nodes
        .iter()
        .map(|(id, n)| (*id, n.member().clone()))
        .collect();
    nodes[&1].initialize(members).await.unwrap();
    eventually("a leader", || nodes.values().all(|n| n.leader().is_some())).await;

    // Node 2 owns the session and subscribes it.
    let epoch = match retry("a claim", || nodes[&2].propose(claim("s", 2))).await {
        Outcome::Claimed { epoch, .. } => epoch,
        other => panic!("{other:?}"),
    };
    let subscribe = Command::SessionProgress {
        client_id: "s".into(),
        node: 2,
        epoch,
        steps: vec![Step::Subscribe {
            filter: "t/+".into(),
            options: SubscriptionOptions {
                qos: 1,
                no_local: false,
                retain_as_published: false,
                identifier: None,
            },
        }],
    };
    assert_eq!(
        retry("a subscribe", || nodes[&2].propose(subscribe.clone())).await,
        Outcome::Progressed { ignored: 0 }
    );

    // Node 1 finds the session by the topic in its own copy of the state ...
    eventually("node 1 sees the subscription", || {
        nodes[&1]
            .state()
            .read(|s| s.persistent_matches("t/x").len() == 1)
    })
    .await;
    let targets: Vec<(String, u8)> = nodes[&1].state().read(|s| {
        s.persistent_matches("t/x")
            .iter()
            .map(|m| (m.client_id.to_owned(), m.options.qos))
            .collect()
    });
    assert_eq!(targets, [("s".to_owned(), 1)]);
    // ... and enqueues through its proposer, with a stale step of its own in the same batch.
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    let (tx, mut settled) = tokio::sync::mpsc::unbounded_channel::<Settled>();
    let proposer = {
        let node = nodes[&1].clone();
        Proposer::start(
            &tasks,
            stop.clone(),
            (1, nodes[&1].incarnation()),
            move |command| {
                let node = node.clone();
                Box::pin(async move { node.propose(command).await.map_err(|e| e.to_string()) })
            },
            move |s| {
                let _ = tx.send(s);
            },
        )
    };
    let enqueue = Command::Enqueue {
        id: MessageId {
            node: 1,
            incarnation: nodes[&1].incarnation(),
            counter: 1,
        },
        message: StoredMessage {
            topic: "t/x".into(),
            payload: b"hello".to_vec(),
            qos: 1,
            retain: false,
            properties: Default::default(),
        },
        targets,
        max_queued: 100,
    };
    let first = proposer.record(enqueue.clone());
    let stale = proposer.record(Command::SessionProgress {
        client_id: "s".into(),
        node: 1,
        epoch,
        steps: vec![],
    });
    let again = proposer.record(enqueue);
    let mut outcomes = Vec::new();
    while outcomes.len() < 3 {
        let s = settled.recv().await.unwrap();
        assert_eq!(s.first, first + outcomes.len() as u64);
        outcomes.extend(s.result.unwrap());
    }
    assert_eq!(
        outcomes[0],
        Outcome::Enqueued {
            results: vec![EnqueueResult::Queued(0)]
        }
    );
    assert!(
        matches!(outcomes[1], Outcome::Rejected(_)),
        "ticket {stale}: {:?}",
        outcomes[1]
    );
    assert_eq!(
        outcomes[2],
        Outcome::Enqueued {
            results: vec![EnqueueResult::Held(0)]
        },
        "ticket {again}: the same message once"
    );

    // Every node is told, and the owner (node 2) acts on it.
    eventually("node 2 told of the message", || {
        told[&2].0.lock().unwrap().iter().any(|e| {
            matches!(e, Effect::Queued { client_id, owner: 2, seq: 0, message, .. }
                if client_id == "s" && message.payload == b"hello")
        })
    })
    .await;

    // Node 3 takes the session over: node 2 is told it lost it.
    let _ = told[&2].take();
    let outcome = retry("a takeover", || nodes[&3].propose(claim("s", 3))).await;
    assert!(
        matches!(outcome, Outcome::Claimed { present: true, .. }),
        "the takeover keeps the session: {outcome:?}"
    );
    eventually("node 2 told of the takeover", || {
        told[&2].0.lock().unwrap().iter().any(|e| {
            matches!(e, Effect::Claimed { client_id, owner: 3, previous: Some((2, p)), .. }
                if client_id == "s" && *p == epoch)
        })
    })
    .await;
    // The new owner reads what is queued from its own copy.
    eventually("node 3 holds the queued message", || {
        nodes[&3].state().read(|s| {
            s.session_data("s")
                .is_some_and(|d| d.queue.len() == 1 && d.queue[0].message.payload == b"hello")
        })
    })
    .await;

    // A claim past its deadline (its claimant gave the CONNECT up) is refused wherever it is
    // proposed, the leader included: nothing is appended, the session stays node 3's.
    let with_deadline = |node, not_after: u64| {
        let mut c = claim("s", node);
        if let Command::ClaimSession { not_after_ms, .. } = &mut c {
            *not_after_ms = not_after;
        }
        c
    };
    for node in [1, 2, 3] {
        let late = with_deadline(node, 1);
        let outcome = retry("a late claim", || nodes[&node].propose(late.clone())).await;
        assert!(
            matches!(outcome, Outcome::Rejected(Rejection::ClaimTooLate { .. })),
            "node {node}: {outcome:?}"
        );
    }
    let owner = nodes[&3]
        .state()
        .read(|s| s.session("s").map(|o| (o.owner, o.epoch)));
    assert_eq!(owner, Some((3, epoch + 1)), "a late claim was applied");

    // The leader tells a claimant how long the session's owner has been quiet: no longer
    // than since the owner's last proposal reached it ...
    let since = std::time::Instant::now();
    let confirm = Command::Sequenced {
        node: 3,
        incarnation: nodes[&3].incarnation(),
        seq: 1,
        commands: vec![Command::SessionProgress {
            client_id: "s".into(),
            node: 3,
            epoch: epoch + 1,
            steps: vec![],
        }],
    };
    let _ = retry("node 3 proposes", || nodes[&3].propose(confirm.clone())).await;
    // (A claim within its deadline goes through.)
    let in_time = with_deadline(2, unix_ms_now() + 60_000);
    let Outcome::Claimed { owner_quiet_ms, .. } =
        retry("a takeover", || nodes[&2].propose(in_time.clone())).await
    else {
        panic!("not claimed");
    };
    let bound = since.elapsed().as_millis();
    assert!(
        u128::from(owner_quiet_ms) <= bound,
        "quiet for {owner_quiet_ms} ms, though it proposed {bound} ms ago"
    );
    // ... and at least as long as it has been gone, even when it led (then no leader heard
    // from it since the election, and the election came at least 1.5 s after it last led).
    let gone = nodes.remove(&2).unwrap();
    Arc::try_unwrap(gone).ok().unwrap().shutdown().await;
    let since = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let Outcome::Claimed { owner_quiet_ms, .. } = retry("a takeover from a node gone", || {
        nodes[&3].propose(claim("s", 3))
    })
    .await
    else {
        panic!("not claimed");
    };
    assert!(
        u128::from(owner_quiet_ms) >= since.elapsed().as_millis().min(1000),
        "quiet for only {owner_quiet_ms} ms"
    );

    stop.cancel();
    tasks.close();
    tasks.wait().await;
    for node in nodes.into_values() {
        if let Ok(node) = Arc::try_unwrap(node) {
            node.shutdown().await;
        }
    }
}

fn unix_ms_now() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    u64::try_from(since.unwrap().as_millis()).unwrap()
}
