//! Routes and message forwarding between three nodes in one process, over real QUIC on
//! loopback with mutual TLS: routes converge, a message reaches the nodes with matching
//! subscribers only and exactly once, order per topic, a restarted node's old routes are
//! dropped, a peer down costs drops and no memory, and routes resync when it is back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqttd_cluster::{ClusterNode, ForwardedMessage, Incoming, Member, MessageProperties, NodeId};

mod support;

use support::{eventually, options, retry, Ca, PATIENCE};

/// Waits for the next forwarded message, with [`PATIENCE`].
async fn next(rx: &mut Incoming) -> ForwardedMessage {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("a forwarded message in time")
        .expect("the router is running")
}

/// Whether every node holds the same digest of every running node's routes as that node
/// itself.
fn digests_agree(nodes: &BTreeMap<NodeId, ClusterNode>) -> bool {
    nodes.iter().all(|(id, node)| {
        let own = node.router().digests()[id];
        nodes
            .values()
            .all(|other| other.router().digests().get(id) == Some(&own))
    })
}

fn link_up(from: &ClusterNode, to: NodeId) -> bool {
    from.router()
        .stats()
        .nodes
        .get(&to)
        .is_some_and(|s| s.link_up)
}

fn message(origin: NodeId, topic: &str, payload: impl Into<Bytes>) -> ForwardedMessage {
    ForwardedMessage::new(origin, topic, payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_converge_and_messages_go_where_subscribers_are() {
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
    let addrs: BTreeMap<NodeId, SocketAddr> = nodes
        .iter()
        .map(|(id, n)| (*id, n.local_addr().unwrap()))
        .collect();
    let members: BTreeMap<NodeId, Member> = nodes
        .iter()
        .map(|(id, n)| (*id, n.member().clone()))
        .collect();
    nodes[&1].initialize(members).await.unwrap();
    let mut incoming: BTreeMap<NodeId, Incoming> = nodes
        .iter()
        .map(|(id, n)| (*id, n.router().incoming().unwrap()))
        .collect();
    assert!(nodes[&1].router().incoming().is_none(), "one receiver");

    // Routes: two subscribers of one filter on C announce it once; B holds another filter.
    let (a, b, c) = (1, 2, 3);
    nodes[&c].router().subscribe("sensors/+/temp");
    nodes[&c].router().subscribe("sensors/+/temp");
    nodes[&c].router().subscribe("$share/g/jobs/#");
    nodes[&b].router().subscribe("other/#");
    nodes[&b].router().subscribe("$share/g/jobs/#");
    eventually("routes converge", || {
        digests_agree(&nodes)
            && nodes[&a].router().stats().nodes.get(&c).map(|s| s.routes) == Some(2)
            && (1..=3).all(|f| (1..=3).all(|t| f == t || link_up(&nodes[&f], t)))
    })
    .await;
    assert_eq!(
        nodes[&a].router().nodes_for("sensors/1/temp"),
        [c].into_iter().collect()
    );

    // A message for C's filter, with every property that travels, reaches C once, not B.
    let mut sent = message(a, "sensors/1/temp", "21.5");
    sent.qos = 1;
    sent.retain = true;
    sent.properties = MessageProperties {
        payload_format_indicator: Some(true),
        message_expiry_interval: Some(30),
        content_type: Some("text/plain".into()),
        response_topic: Some("replies/a".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01")),
        user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
    };
    assert_eq!(nodes[&a].router().forward(&sent), 1);
    // A message published elsewhere is never forwarded again.
    assert_eq!(
        nodes[&a]
            .router()
            .forward(&message(b, "sensors/1/temp", "x")),
        0
    );
    assert_eq!(
        nodes[&a].router().forward(&message(a, "nobody/here", "x")),
        0
    );
    assert_eq!(next(incoming.get_mut(&c).unwrap()).await, sent);
    assert_eq!(nodes[&c].router().forward(&sent), 0, "not forwarded again");

    // Order per topic holds for 1,000 messages over two interleaved topics; the end marker
    // on each topic shows nothing more (no duplicate) was in between.
    for i in 0..1000u32 {
        let topic = if i % 2 == 0 {
            "sensors/1/temp"
        } else {
            "sensors/2/temp"
        };
        assert_eq!(
            nodes[&a]
                .router()
                .forward(&message(a, topic, i.to_be_bytes().to_vec())),
            1
        );
    }
    for topic in ["sensors/1/temp", "sensors/2/temp"] {
        nodes[&a].router().forward(&message(a, topic, "end"));
    }
    let mut seen: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut ended = 0;
    while ended < 2 {
        let m = next(incoming.get_mut(&c).unwrap()).await;
        if m.payload == "end" {
            ended += 1;
            continue;
        }
        let i = u32::from_be_bytes(m.payload.as_ref().try_into().unwrap());
        seen.entry(m.topic).or_default().push(i);
    }
    assert_eq!(
        seen["sensors/1/temp"],
        (0..1000).filter(|i| i % 2 == 0).collect::<Vec<_>>()
    );
    assert_eq!(
        seen["sensors/2/temp"],
        (0..1000).filter(|i| i % 2 == 1).collect::<Vec<_>>()
    );
    assert!(
        incoming.get_mut(&b).unwrap().try_recv().is_none(),
        "B got nothing"
    );
    let stats = nodes[&a].router().stats();
    assert_eq!(stats.forwarded_out, 1003);
    assert_eq!(stats.dropped, 0);
    assert_eq!(nodes[&c].router().stats().forwarded_in, 1003);
    assert_eq!(nodes[&b].router().stats().forwarded_in, 0);

    // A share group with members on B and C (none on A) gets one copy per message, on one
    // of them, naming the group.
    for i in 0..20 {
        let topic = format!("jobs/{i}");
        assert_eq!(nodes[&a].router().forward(&message(a, &topic, "job")), 1);
    }
    let mut jobs = 0;
    let deadline = Instant::now() + PATIENCE;
    while jobs < 20 {
        assert!(
            Instant::now() < deadline,
            "share group copies: {jobs} of 20"
        );
        for id in [b, c] {
            let rx = incoming.get_mut(&id).unwrap();
            while let Some(m) = rx.try_recv() {
                assert!(m.topic.starts_with("jobs/"));
                assert_eq!(m.share_groups, vec!["g".to_owned()]);
                jobs += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(nodes[&a].router().stats().forwarded_out, 1023);

    // C restarts: a new life. Its old routes are dropped at the peers, its new ones learned.
    let old_c = nodes.remove(&c).unwrap();
    let old_incarnation = old_c.incarnation();
    old_c.shutdown().await;
    let start = Instant::now();
    let restarted = retry("restarting C", || {
        ClusterNode::start(options(&ca, dir.path(), c, addrs[&c]))
    })
    .await;
    eprintln!("restart: {:.2} s", start.elapsed().as_secs_f64());
    assert!(restarted.incarnation() > old_incarnation);
    restarted.router().subscribe("fresh/+");
    let mut c_in = restarted.router().incoming().unwrap();
    nodes.insert(c, restarted);
    eventually("C's new life learned", || {
        [a, b].iter().all(|id| {
            let r = nodes[id].router();
            let s = r.stats();
            s.nodes.get(&c).and_then(|n| n.incarnation) == Some(nodes[&c].incarnation())
                && r.nodes_for("sensors/1/temp").is_empty()
                && r.nodes_for("fresh/x") == [c].into_iter().collect()
        }) && digests_agree(&nodes)
            && link_up(&nodes[&a], c)
    })
    .await;
    assert_eq!(nodes[&a].router().forward(&message(a, "fresh/x", "hi")), 1);
    assert_eq!(next(&mut c_in).await.topic, "fresh/x");

    // B goes down: forwarding to it counts drops and queues nothing.
    let old_b = nodes.remove(&b).unwrap();
    old_b.shutdown().await;
    eventually("A sees B's link down", || !link_up(&nodes[&a], b)).await;
    let before = nodes[&a].router().stats().nodes[&b].dropped;
    for i in 0..10_000u32 {
        assert_eq!(
            nodes[&a]
                .router()
                .forward(&message(a, "other/x", i.to_be_bytes().to_vec())),
            0
        );
    }
    let s = nodes[&a].router().stats();
    assert_eq!(s.nodes[&b].dropped - before, 10_000);
    assert_eq!(s.nodes[&b].queued, 0, "nothing held for a dead peer");

    // While B is away, A's routes change; when B is back, it learns them (a snapshot on its
    // new link) and A learns B's new life.
    nodes[&a].router().subscribe("while/away");
    nodes[&a].router().subscribe("$share/h/#");
    let back = retry("restarting B", || {
        ClusterNode::start(options(&ca, dir.path(), b, addrs[&b]))
    })
    .await;
    back.router().subscribe("other/#");
    let mut b_in = back.router().incoming().unwrap();
    nodes.insert(b, back);
    eventually("routes resync after B is back", || {
        digests_agree(&nodes)
            && nodes[&b].router().stats().nodes.get(&a).map(|s| s.routes) == Some(2)
            && link_up(&nodes[&a], b)
    })
    .await;
    assert_eq!(
        nodes[&a].router().forward(&message(a, "other/y", "again")),
        1
    );
    assert_eq!(next(&mut b_in).await.payload, "again");

    for (_, node) in nodes {
        node.shutdown().await;
    }
}

/// A node whose broker takes nothing holds at most its inbox's byte budget (here 8 MiB) of
/// forwarded messages: beyond it, it stops reading, and the sender drops what does not fit
/// its own bounded queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_does_not_keep_up_holds_a_bounded_inbox() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let a = ClusterNode::start(options(&ca, dir.path(), 1, any))
        .await
        .unwrap();
    let mut small = options(&ca, dir.path(), 2, any);
    small.forward.incoming_bytes = 8 * 1024 * 1024;
    let b = ClusterNode::start(small).await.unwrap();
    let members = BTreeMap::from([(1, a.member().clone()), (2, b.member().clone())]);
    a.initialize(members).await.unwrap();
    // B's broker never reads its inbox.
    let _inbox = b.router().incoming().unwrap();
    b.router().subscribe("big/#");
    eventually("A learns B's route", || {
        a.router().nodes_for("big/0") == [2].into_iter().collect() && link_up(&a, 2)
    })
    .await;

    // 200 messages of 1 MiB over 16 topics (all buckets): 200 MiB offered, in bursts that
    // A's link has time to write while B reads.
    let payload = Bytes::from(vec![7u8; 1024 * 1024]);
    for i in 0..200 {
        a.router()
            .forward(&message(1, &format!("big/{}", i % 16), payload.clone()));
        if i % 8 == 7 {
            let until = Instant::now() + Duration::from_millis(100);
            while a.router().stats().nodes[&2].queued > 0 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    // B stops reading once its inbox is full; wait until what it read stays put.
    let mut taken = b.router().stats().forwarded_in;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = b.router().stats().forwarded_in;
        if now == taken {
            break;
        }
        taken = now;
    }
    let out = a.router().stats().nodes[&2].clone();
    eprintln!(
        "forwarded {}, dropped {}, queued {}, read by B {taken}",
        out.forwarded, out.dropped, out.queued
    );
    // One message may be in the middle of its write (out of the queue, not yet counted).
    let accounted = out.forwarded + out.dropped + out.queued as u64;
    assert!(
        (199..=200).contains(&accounted),
        "{accounted} of 200 accounted for"
    );
    // 7 fit the 8 MiB budget, one per bucket waits for room: 23 at most read.
    assert!(taken <= 30, "B read {taken} MiB it cannot hold");
    assert!(
        taken >= 5,
        "B read only {taken}: the budget was not reached"
    );
    assert!(out.dropped >= 80, "A dropped only {}", out.dropped);

    a.shutdown().await;
    b.shutdown().await;
}
