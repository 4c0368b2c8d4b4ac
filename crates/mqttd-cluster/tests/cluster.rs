//! A 3-node cluster in one process, over real QUIC on loopback with mutual TLS: election,
//! replication, session fencing, the leader shut down, a node restarted from its store.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mqttd_cluster::config::ClusterConfig;
use mqttd_cluster::network::ALPN;
use mqttd_cluster::openraft::error::RaftError;
use mqttd_cluster::openraft::raft::{VoteRequest, VoteResponse};
use mqttd_cluster::openraft::{SnapshotPolicy, Vote};
use mqttd_cluster::state::Retained;
use mqttd_cluster::{
    ClusterNode, Command, Member, NodeError, NodeId, NodeOptions, Outcome, Rejection,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

mod support;

use support::{claim, eventually, name, options, retry, Ca, PATIENCE};

/// The leader all running nodes agree on.
fn agreed_leader(nodes: &BTreeMap<NodeId, ClusterNode>) -> Option<NodeId> {
    let mut leaders = nodes.values().map(ClusterNode::leader);
    let first = leaders.next()??;
    leaders.all(|l| l == Some(first)).then_some(first)
}

/// Proposes `command` on whichever node leads, retrying while leadership moves.
async fn propose(nodes: &BTreeMap<NodeId, ClusterNode>, command: Command) -> Outcome {
    retry("a proposal", || {
        let command = command.clone();
        async move {
            let leader = agreed_leader(nodes).ok_or(NodeError::NotLeader { leader: None })?;
            nodes[&leader].propose(command).await
        }
    })
    .await
}

fn epoch_of(node: &ClusterNode, client_id: &str) -> Option<(NodeId, u64)> {
    node.state()
        .read(|s| s.session(client_id).map(|o| (o.owner, o.epoch)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_replicate_fence_fail_over_and_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut nodes = BTreeMap::new();
    for id in 1..=3 {
        let node = ClusterNode::start(options(&ca, dir.path(), id, any))
            .await
            .unwrap();
        nodes.insert(id, node);
    }
    let members: BTreeMap<NodeId, Member> = nodes
        .iter()
        .map(|(id, n)| (*id, n.member().clone()))
        .collect();
    let addrs: BTreeMap<NodeId, SocketAddr> = nodes
        .iter()
        .map(|(id, n)| (*id, n.local_addr().unwrap()))
        .collect();
    nodes[&1].initialize(members).await.unwrap();

    // A leader is elected and every node knows it.
    eventually("a leader all nodes agree on", || {
        agreed_leader(&nodes).is_some()
    })
    .await;
    // Every node watches its leader confirm a quorum, whether or not anything asks.
    eventually("every node on the quorum's side", || {
        nodes.values().all(ClusterNode::in_quorum)
    })
    .await;

    // Commands replicate to all.
    for id in 1..=3 {
        let up = Command::NodeUp {
            now_ms: 0,
            node: id,
            name: name(id),
            incarnation: nodes[&id].incarnation(),
        };
        assert_eq!(propose(&nodes, up).await, Outcome::Done);
    }
    let Outcome::Claimed {
        epoch: first,
        previous: None,
        ..
    } = propose(&nodes, claim("c1", 1)).await
    else {
        panic!("the first claim creates the session");
    };
    let retained = Retained {
        payload: b"on".to_vec(),
        qos: 1,
        ..Retained::default()
    };
    let set = Command::SetRetained {
        topic: "lights/1".into(),
        message: retained.clone(),
    };
    assert_eq!(propose(&nodes, set).await, Outcome::Done);
    eventually("the first commands on every node", || {
        nodes.values().all(|n| {
            n.state().read(|s| {
                s.nodes().len() == 3
                    && s.session("c1").map(|o| o.epoch) == Some(first)
                    && s.retained("lights/1") == Some(&retained)
            })
        })
    })
    .await;

    // A follower forwards a proposal to the leader and gets the leader's outcome.
    let leader = agreed_leader(&nodes).unwrap();
    let follower = nodes.keys().copied().find(|id| *id != leader).unwrap();
    let Outcome::Claimed { epoch, .. } = nodes[&follower]
        .propose(claim("via-follower", follower))
        .await
        .unwrap()
    else {
        panic!("a claim forwarded by a follower");
    };
    eventually("the forwarded claim on every node", || {
        nodes
            .values()
            .all(|n| epoch_of(n, "via-follower") == Some((follower, epoch)))
    })
    .await;

    // A claim by another node bumps the epoch; the old owner is fenced off.
    let Outcome::Claimed {
        epoch: second,
        previous,
        ..
    } = propose(&nodes, claim("c1", 2)).await
    else {
        panic!("a claim of an existing session");
    };
    assert!(second > first);
    assert_eq!(previous, Some((1, first)));
    let stale = Command::DropSession {
        client_id: "c1".into(),
        node: 1,
        epoch: first,
    };
    assert_eq!(
        propose(&nodes, stale).await,
        Outcome::Rejected(Rejection::StaleEpoch {
            given: first,
            current: second,
            owner: 2
        })
    );
    eventually("the claim on every node", || {
        nodes
            .values()
            .all(|n| epoch_of(n, "c1") == Some((2, second)))
    })
    .await;

    // The leader goes; the two others elect a new one and keep the state.
    let old = agreed_leader(&nodes).unwrap();
    let start = Instant::now();
    nodes.remove(&old).unwrap().shutdown().await;
    eprintln!("shutdown: {:.2} s", start.elapsed().as_secs_f64());
    eventually("a new leader among the survivors", || {
        agreed_leader(&nodes).is_some_and(|l| l != old)
    })
    .await;
    let new = agreed_leader(&nodes).unwrap();
    assert_eq!(epoch_of(&nodes[&new], "c1"), Some((2, second)));
    assert_eq!(
        nodes[&new]
            .state()
            .read(|s| s.retained("lights/1").cloned()),
        Some(retained.clone())
    );
    let start = Instant::now();
    let Outcome::Claimed { epoch: third, .. } = propose(&nodes, claim("c2", 3)).await else {
        panic!("a claim after the failover");
    };
    assert!(third > second, "epochs keep growing across leaders");
    eprintln!(
        "first proposal to the new leader: {:.2} s",
        start.elapsed().as_secs_f64()
    );
    let delete = Command::DeleteRetained {
        topic: "lights/1".into(),
    };
    assert_eq!(propose(&nodes, delete).await, Outcome::Done);

    // The old leader comes back on its address, with its state read from its own store...
    let start = Instant::now();
    let restarted = retry("restarting the old leader", || {
        ClusterNode::start(options(&ca, dir.path(), old, addrs[&old]))
    })
    .await;
    eprintln!("restart: {:.2} s", start.elapsed().as_secs_f64());
    assert_eq!(
        epoch_of(&restarted, "c1"),
        Some((2, second)),
        "the committed state is back from the store before any peer speaks"
    );
    assert_eq!(restarted.incarnation(), 2, "a new life");
    let up = Command::NodeUp {
        now_ms: 0,
        node: old,
        name: name(old),
        incarnation: restarted.incarnation(),
    };
    // It proposes its new life through the leader, once it knows who leads.
    // (A forward that failed on the way may have been committed: then the retry is stale.)
    let outcome = retry("the restarted node's NodeUp", || {
        restarted.propose(up.clone())
    })
    .await;
    assert!(
        matches!(
            outcome,
            Outcome::Done
                | Outcome::Rejected(Rejection::StaleIncarnation {
                    given: 2,
                    current: 2
                })
        ),
        "{outcome:?}"
    );
    nodes.insert(old, restarted);
    // ...and catches up with what was committed while it was away.
    eventually("the restarted node catching up", || {
        let n = &nodes[&old];
        epoch_of(n, "c2") == Some((3, third))
            && n.state().read(|s| {
                s.retained("lights/1").is_none()
                    && s.nodes().get(&old).map(|r| r.incarnation) == Some(2)
            })
    })
    .await;
    eventually("all three agreeing on the leader", || {
        agreed_leader(&nodes).is_some()
    })
    .await;
    eventually("all three on the quorum's side again", || {
        nodes.values().all(ClusterNode::in_quorum)
    })
    .await;
    // A follower learns of the last commit at the next heartbeat: poll.
    eventually("all nodes holding the same state", || {
        let all: Vec<_> = nodes
            .values()
            .map(|n| n.state().read(|s| s.clone()))
            .collect();
        all.windows(2).all(|w| w[0] == w[1])
    })
    .await;

    for (id, node) in nodes {
        let start = Instant::now();
        node.shutdown().await;
        eprintln!(
            "node {id} shut down: {:.2} s",
            start.elapsed().as_secs_f64()
        );
    }
}

/// A client with a certificate from another CA, or with none, cannot talk to a node; one with
/// a certificate from the cluster's CA gets its answer, unless it speaks for a member whose
/// name its certificate does not carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_peers_with_a_certificate_from_the_cluster_ca_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let node = ClusterNode::start(options(&ca, dir.path(), 1, "127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    let addr = node.local_addr().unwrap();
    // Node 2 is a member that never comes: node 1 stays a candidate, and knows node 2's name.
    let node_2 = Member {
        name: "node-2".into(),
        addr: "127.0.0.1:9".into(),
    };
    node.initialize(BTreeMap::from([(1, node.member().clone()), (2, node_2)]))
        .await
        .unwrap();
    eventually("the membership in the node's metrics", || {
        let metrics = node.raft().metrics();
        let known = metrics
            .borrow()
            .membership_config
            .membership()
            .get_node(&2)
            .is_some();
        known
    })
    .await;
    let stranger = Ca::new();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca_der = CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap();
    roots.add(ca_der).unwrap();
    let roots = Arc::new(roots);

    let client = |issuer: &Ca, name: Option<&str>| {
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots.clone());
        let Some(name) = name else {
            return builder.with_no_client_auth();
        };
        let (cert, key) = issuer.leaf(name);
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        builder.with_client_auth_cert(chain, key).unwrap()
    };

    // Vote requests from node 9, whom nobody knows, or from node 2, a member.
    for (what, mut config, candidate, admitted) in [
        (
            "a foreign certificate",
            client(&stranger, Some("node-9")),
            9,
            false,
        ),
        ("no certificate", client(&ca, None), 9, false),
        (
            "a cluster certificate, for an unknown node",
            client(&ca, Some("node-9")),
            9,
            true,
        ),
        (
            "a cluster certificate naming the member",
            client(&ca, Some("node-2")),
            2,
            true,
        ),
        (
            "a cluster certificate naming another node",
            client(&ca, Some("node-8")),
            2,
            false,
        ),
    ] {
        let vote = VoteRequest::<NodeId>::new(Vote::new(1, candidate), None);
        let mut request = vec![2];
        serde_json::to_writer(&mut request, &vote).unwrap();
        config.alpn_protocols = vec![ALPN.to_vec()];
        let quic = noq::crypto::rustls::QuicClientConfig::try_from(config).unwrap();
        let endpoint = noq::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(noq::ClientConfig::new(Arc::new(quic)));
        // In TLS 1.3 the client finishes first: a refused handshake shows on the first stream
        // at the latest.
        let exchange = async {
            let conn = endpoint.connect(addr, "node-1").unwrap().await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&request).await?;
            send.finish()?;
            let answer = recv.read_to_end(64 * 1024).await?;
            let vote: Result<VoteResponse<NodeId>, RaftError<NodeId>> =
                serde_json::from_slice(&answer)?;
            Ok::<_, Box<dyn std::error::Error>>(vote)
        };
        let outcome = tokio::time::timeout(PATIENCE, exchange).await.unwrap();
        match outcome {
            Ok(vote) => {
                assert!(admitted, "{what} was let in");
                // Whether the vote is granted is Raft's business; the answer came.
                assert!(vote.is_ok(), "{vote:?}");
            }
            Err(e) => assert!(!admitted, "{what} was refused: {e}"),
        }
        endpoint.close(noq::VarInt::from_u32(0), b"");
    }
    node.shutdown().await;
}

/// A follower away while the others took a snapshot and purged their logs gets the snapshot
/// over the network (openraft's chunked InstallSnapshot over our streams), and keeps it across
/// its own restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_purged_log_gets_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let snapshotting = |id, listen| {
        let mut o = options(&ca, dir.path(), id, listen);
        o.raft.snapshot_policy = SnapshotPolicy::LogsSinceLast(20);
        o.raft.max_in_snapshot_log_to_keep = 0;
        o.raft.purge_batch_size = 1;
        o
    };
    let mut nodes = BTreeMap::new();
    for id in 1..=3 {
        nodes.insert(id, ClusterNode::start(snapshotting(id, any)).await.unwrap());
    }
    let members: BTreeMap<NodeId, Member> = nodes
        .iter()
        .map(|(id, n)| (*id, n.member().clone()))
        .collect();
    nodes[&1].initialize(members).await.unwrap();
    eventually("a leader", || agreed_leader(&nodes).is_some()).await;
    let leader = agreed_leader(&nodes).unwrap();
    let away = *nodes.keys().find(|id| **id != leader).unwrap();
    let addr = nodes[&away].local_addr().unwrap();
    nodes.remove(&away).unwrap().shutdown().await;

    let start = Instant::now();
    for i in 0..60 {
        let set = Command::SetRetained {
            topic: format!("t/{i}"),
            message: Retained {
                payload: vec![1; 100],
                qos: 0,
                ..Retained::default()
            },
        };
        assert_eq!(propose(&nodes, set).await, Outcome::Done);
    }
    eprintln!("60 proposals: {:.2} s", start.elapsed().as_secs_f64());
    eventually("a snapshot and a purged log on the leader", || {
        let m = nodes[&leader].raft().metrics().borrow().clone();
        m.snapshot.is_some_and(|s| s.index >= 20) && m.purged.is_some_and(|p| p.index >= 20)
    })
    .await;

    let start = Instant::now();
    let back = retry("restarting the follower", || {
        ClusterNode::start(snapshotting(away, addr))
    })
    .await;
    eprintln!("restart: {:.2} s", start.elapsed().as_secs_f64());
    nodes.insert(away, back);
    eventually("the follower holding all 60 retained messages", || {
        nodes[&away].state().read(|s| s.retained_count()) == 60
    })
    .await;
    let snapshot = nodes[&away].raft().metrics().borrow().snapshot;
    assert!(
        snapshot.is_some_and(|s| s.index >= 20),
        "caught up by a snapshot: {snapshot:?}"
    );

    // Restarted once more, it has the installed snapshot (and what followed) from its store.
    let addr = nodes[&away].local_addr().unwrap();
    nodes.remove(&away).unwrap().shutdown().await;
    let start = Instant::now();
    let again = retry("restarting it again", || {
        ClusterNode::start(snapshotting(away, addr))
    })
    .await;
    assert!(
        again.state().read(|s| s.retained_count()) >= 20,
        "the installed snapshot is on disk"
    );
    eprintln!("second restart: {:.2} s", start.elapsed().as_secs_f64());
    nodes.insert(away, again);
    for (_, node) in nodes {
        node.shutdown().await;
    }
}

/// A node started from a `[cluster]` section (paths to the CA, certificate and key; the store
/// beside the broker's) runs alone as a cluster of one; a missing key file is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starts_from_its_cluster_section() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (ca_path, cert, key) = ca.files(dir.path(), "solo");
    let text = format!(
        "[cluster]\nnode_id = 5\nname = \"solo\"\nlisten = \"127.0.0.1:0\"\n\
         ca = {ca_path:?}\ncert = {cert:?}\nkey = {key:?}\n"
    );
    let config = ClusterConfig::parse(&text).unwrap();
    let broker_store = dir.path().join("store");
    let node = ClusterNode::start(NodeOptions::from_config(&config, &broker_store).unwrap())
        .await
        .unwrap();
    assert!(
        broker_store.join("cluster").is_dir(),
        "the store beside the broker's"
    );
    assert_ne!(
        node.member().addr,
        "127.0.0.1:0",
        "the bound port is advertised"
    );
    node.initialize(BTreeMap::from([(5, node.member().clone())]))
        .await
        .unwrap();
    eventually("the single node leading", || node.leader() == Some(5)).await;
    let up = Command::NodeUp {
        now_ms: 0,
        node: 5,
        name: "solo".into(),
        incarnation: 1,
    };
    assert_eq!(node.propose(up).await.unwrap(), Outcome::Done);
    assert_eq!(node.state().read(|s| s.nodes().len()), 1);
    node.shutdown().await;

    let missing = ClusterConfig::parse(&text.replace("solo.key", "gone.key")).unwrap();
    let Err(e) = NodeOptions::from_config(&missing, &broker_store) else {
        panic!("a missing key file is refused");
    };
    assert!(e.to_string().contains("gone.key"), "{e}");
}

/// A cluster started as one node grows to three (each new node a learner first, then a
/// voter), replicates to the newcomers, and shrinks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_and_leave() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut nodes = BTreeMap::new();
    for id in 1..=3 {
        let node = ClusterNode::start(options(&ca, dir.path(), id, any))
            .await
            .unwrap();
        nodes.insert(id, node);
    }
    let first = &nodes[&1];
    first
        .initialize(BTreeMap::from([(1, first.member().clone())]))
        .await
        .unwrap();
    eventually("node 1 leading alone", || first.leader() == Some(1)).await;
    first.propose(claim("early", 1)).await.unwrap();
    for id in [2, 3] {
        let member = nodes[&id].member().clone();
        retry("adding a member", || first.add_member(id, member.clone())).await;
    }
    assert_eq!(first.voters(), BTreeSet::from([1, 2, 3]));
    eventually("the newcomers holding what came before them", || {
        nodes.values().all(|n| epoch_of(n, "early") == Some((1, 1)))
    })
    .await;
    eventually("all three agreeing on the leader", || {
        agreed_leader(&nodes).is_some()
    })
    .await;
    eventually("all three on the quorum's side again", || {
        nodes.values().all(ClusterNode::in_quorum)
    })
    .await;

    let leader = agreed_leader(&nodes).unwrap();
    let leaving = *nodes.keys().find(|id| **id != leader).unwrap();
    retry("removing a member", || {
        nodes[&leader].remove_member(leaving)
    })
    .await;
    eventually(
        "the smaller membership everywhere but on the one that left",
        || {
            nodes
                .iter()
                .filter(|(id, _)| **id != leaving)
                .all(|(_, n)| !n.voters().contains(&leaving) && n.voters().len() == 2)
        },
    )
    .await;
    nodes.remove(&leaving).unwrap().shutdown().await;
    // Two voters of two: the cluster still commits.
    let outcome = propose(&nodes, claim("late", leader)).await;
    assert!(matches!(outcome, Outcome::Claimed { .. }), "{outcome:?}");
    for (_, node) in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_leave_requests_over_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut nodes = BTreeMap::new();
    for id in 1..=3 {
        let node = ClusterNode::start(options(&ca, dir.path(), id, any))
            .await
            .unwrap();
        nodes.insert(id, node);
    }
    let seed = |id: NodeId| (id, nodes[&id].member().clone());

    // Nobody has a cluster yet: a seed says so.
    let answer = nodes[&3].join(seed(2)).await;
    assert!(matches!(answer, Err(NodeError::NoCluster)), "{answer:?}");

    let first = &nodes[&1];
    first
        .initialize(BTreeMap::from([(1, first.member().clone())]))
        .await
        .unwrap();
    eventually("node 1 leading alone", || first.leader() == Some(1)).await;
    assert!(first.is_member() && !nodes[&2].is_initialized());

    // Through the leader, then through a follower (which names the leader).
    retry("node 2 joining through the leader", || {
        nodes[&2].join(seed(1))
    })
    .await;
    eventually("node 2 knowing it is a member", || nodes[&2].is_member()).await;
    retry("node 3 joining through a follower", || {
        nodes[&3].join(seed(2))
    })
    .await;
    assert_eq!(first.voters(), BTreeSet::from([1, 2, 3]));
    // Asking again changes nothing.
    retry("node 2 joining again", || nodes[&2].join(seed(3))).await;
    assert_eq!(first.voters(), BTreeSet::from([1, 2, 3]));

    // A node whose certificate does not carry the name it asks to join under is refused.
    let mut impostor = options(&ca, dir.path(), 5, any);
    impostor.member.name = name(6);
    let impostor = ClusterNode::start(impostor).await.unwrap();
    let answer = impostor.join(seed(1)).await;
    assert!(answer.is_err(), "{answer:?}");
    assert_eq!(first.voters(), BTreeSet::from([1, 2, 3]));
    impostor.shutdown().await;

    // A follower asks for another's removal: the leader makes it.
    retry("node 3 removing node 2", || nodes[&3].leave(2)).await;
    eventually("node 2 gone from the leader's membership", || {
        first.voters() == BTreeSet::from([1, 3])
    })
    .await;
    for (_, node) in nodes {
        node.shutdown().await;
    }
}
