//! Scenarios on the simulation of the real broker: each is checked by what the clients'
//! applications saw, what went over the wire, and what storage recorded.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqttd_proto::client::{ClientConfig, Event as ClientEvent};
use mqttd_proto::{
    Message, Packet, PacketId, PacketType, Publish, PublishProperties, QoS, ReasonCode, StreamId,
    SubscribeProperties, Subscription, SubscriptionOptions, TopicFilter, TopicName, Will,
    WillProperties,
};

use super::{id, now, ClientRef, Sim, SOCKET_BUFFER};
use crate::config::Config;
use crate::core::{BACKPRESSURE_WAIT, WRITE_HIGH_WATER};

fn config() -> Config {
    Config {
        allow_anonymous: Some(true),
        ..Config::default()
    }
}

/// A persistent MQTT 5 client.
fn persistent(name: &str) -> ClientConfig {
    let mut c = ClientConfig::new(id(name));
    c.clean_start = false;
    c.session_expiry_interval = 3600;
    c
}

fn subscribe(sim: &mut Sim, c: ClientRef, filter: &str, qos: QoS) {
    let options = SubscriptionOptions {
        qos,
        ..SubscriptionOptions::default()
    };
    sim.get(c)
        .conn
        .subscribe(
            vec![Subscription {
                filter: TopicFilter::try_from(filter).unwrap(),
                options,
            }],
            SubscribeProperties::default(),
        )
        .unwrap();
}

fn publish(sim: &mut Sim, c: ClientRef, topic: &str, payload: &str, qos: QoS) {
    let message = Message::new(
        TopicName::try_from(topic).unwrap(),
        payload.as_bytes().to_vec(),
        qos,
        false,
    );
    let _ = sim.get(c).conn.publish(now(), Arc::new(message)).unwrap();
}

/// The payloads of the messages `c`'s application received, in order.
fn received(sim: &mut Sim, c: ClientRef) -> Vec<String> {
    sim.get(c)
        .events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Publish(p) => {
                Some(String::from_utf8_lossy(&p.message.payload).into_owned())
            }
            _ => None,
        })
        .collect()
}

fn connected(sim: &mut Sim, c: ClientRef) -> usize {
    sim.get(c)
        .events
        .iter()
        .filter(|e| matches!(e, ClientEvent::Connected(_)))
        .count()
}

/// The packets of `kind` `c` received, with their streams.
fn packets(sim: &mut Sim, c: ClientRef, kind: PacketType) -> Vec<(StreamId, Packet)> {
    sim.get(c)
        .received
        .iter()
        .filter(|(_, p)| p.packet_type() == kind)
        .cloned()
        .collect()
}

fn numbered(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i}")).collect()
}

#[tokio::test(start_paused = true)]
async fn qos2_is_delivered_exactly_once_in_order_across_a_takeover() {
    // Cut the subscriber's connection after each number of packets it has read: every point
    // of the QoS 2 exchange on its side, in flight, when the new connection takes over.
    for read_before_takeover in 0..8 {
        let mut sim = Sim::new(config());
        let sub = sim.client(persistent("sub"));
        let publisher = sim.client(ClientConfig::new(id("pub")));
        sim.connect(sub);
        sim.connect(publisher);
        subscribe(&mut sim, sub, "t/#", QoS::ExactlyOnce);
        sim.drive().await;
        for m in numbered(5) {
            publish(&mut sim, publisher, "t/x", &m, QoS::ExactlyOnce);
        }
        // The subscriber reads only so far, then its network changes.
        sim.get(sub).reading = false;
        sim.drive().await;
        let seen = sim.get(sub).received.len();
        sim.get(sub).reading = true;
        while sim.get(sub).received.len() < seen + read_before_takeover {
            let before = sim.get(sub).received.len();
            sim.drive().await;
            if sim.get(sub).received.len() == before {
                break;
            }
        }
        sim.reconnect_over(sub);
        sim.advance(Duration::from_secs(1)).await;
        assert_eq!(
            connected(&mut sim, sub),
            2,
            "the new connection was accepted"
        );
        assert_eq!(
            received(&mut sim, sub),
            numbered(5),
            "exactly once, in order, after reading {read_before_takeover} packets"
        );
        // The session went to the new connection: nothing is parked or left over.
        assert!(sim.is_linked(sub));
    }
}

/// A persistent subscriber to `t` at QoS 1 and a persistent publisher, both connected.
async fn persistent_pair() -> (Sim, ClientRef, ClientRef) {
    let mut sim = Sim::new(config());
    let sub = sim.client(persistent("sub"));
    let publisher = sim.client(persistent("pub"));
    sim.connect(sub);
    sim.connect(publisher);
    subscribe(&mut sim, sub, "t", QoS::AtLeastOnce);
    sim.drive().await;
    (sim, sub, publisher)
}

#[tokio::test(start_paused = true)]
async fn acknowledgements_and_stored_messages_wait_until_durable() {
    let (mut sim, sub, publisher) = persistent_pair().await;
    assert_eq!(connected(&mut sim, sub), 1);

    sim.auto_durable = false;
    publish(&mut sim, publisher, "t", "held", QoS::AtLeastOnce);
    sim.drive().await;
    // Stored for the subscriber, not durable yet: no PUBACK to the publisher, no PUBLISH to
    // the subscriber.
    assert!(
        sim.storage
            .pending()
            .iter()
            .any(|c| c.starts_with("store sub")),
        "{:?}",
        sim.storage.pending()
    );
    assert!(packets(&mut sim, publisher, PacketType::PubAck).is_empty());
    assert!(received(&mut sim, sub).is_empty());

    sim.storage.make_durable();
    sim.drive().await;
    assert_eq!(packets(&mut sim, publisher, PacketType::PubAck).len(), 1);
    assert_eq!(received(&mut sim, sub), ["held"]);
}

#[tokio::test(start_paused = true)]
async fn a_storage_failure_closes_the_waiting_connection_without_acknowledging() {
    let (mut sim, _sub, publisher) = persistent_pair().await;
    sim.auto_durable = false;
    publish(&mut sim, publisher, "t", "lost", QoS::AtLeastOnce);
    sim.drive().await;
    sim.storage.fail();
    sim.drive().await;
    assert!(packets(&mut sim, publisher, PacketType::PubAck).is_empty());
    let disconnects = packets(&mut sim, publisher, PacketType::Disconnect);
    assert!(
        matches!(&disconnects[..], [(_, Packet::Disconnect(d))] if d.reason == ReasonCode::UnspecifiedError),
        "{disconnects:?}"
    );
    assert!(!sim.is_linked(publisher));
}

/// Failures that come and go while a publisher waits, seen only afterwards (the watermark
/// shows the latest state: the second failure's lost changes, and a durable number above the
/// first's): the publisher is closed, never acknowledged; a publication after the recovery is
/// acknowledged.
#[tokio::test(start_paused = true)]
async fn a_storage_failure_seen_only_after_recovery_still_refuses_what_it_lost() {
    let (mut sim, sub, publisher) = persistent_pair().await;
    sim.auto_durable = false;
    publish(&mut sim, publisher, "t", "lost", QoS::AtLeastOnce);
    sim.drive().await;
    sim.storage.fail();
    sim.storage.recover();
    // A change after the recovery is made durable: its number is above the lost one's. Then
    // a second failure, whose lost changes are all the watermark remembers.
    let _ = crate::storage::Storage::remove_session(&*sim.storage, &id("other"));
    sim.storage.make_durable();
    sim.storage.fail();
    sim.storage.recover();
    sim.storage.make_durable();
    sim.drive().await;
    assert!(packets(&mut sim, publisher, PacketType::PubAck).is_empty());
    assert!(!sim.is_linked(publisher), "the waiting publisher is closed");
    // The storage works again: a new publication to the persistent session is acknowledged.
    let late = sim.client(ClientConfig::new(id("late")));
    sim.connect(late);
    sim.auto_durable = true;
    publish(&mut sim, late, "t", "after", QoS::AtLeastOnce);
    sim.drive().await;
    sim.storage.make_durable();
    sim.drive().await;
    assert_eq!(packets(&mut sim, late, PacketType::PubAck).len(), 1);
    let _ = sub;
}

#[tokio::test(start_paused = true)]
async fn a_stalled_subscriber_holds_publishers_back_briefly_then_loses_only_its_own() {
    let mut sim = Sim::new(config());
    let stalled = sim.client(ClientConfig::new(id("stalled")));
    let reader = sim.client(ClientConfig::new(id("reader")));
    let publisher = sim.client(ClientConfig::new(id("pub")));
    for c in [stalled, reader, publisher] {
        sim.connect(c);
    }
    subscribe(&mut sim, stalled, "t", QoS::AtMostOnce);
    subscribe(&mut sim, reader, "t", QoS::AtMostOnce);
    sim.drive().await;
    sim.get(stalled).reading = false;
    let payload = "x".repeat(1000);
    let n = 2000;
    for i in 0..n {
        publish(
            &mut sim,
            publisher,
            "t",
            &format!("{i} {payload}"),
            QoS::AtMostOnce,
        );
    }
    sim.drive().await;
    // The stalled subscriber's output filled up: the publisher is not read from (its
    // publication waits for room), and nothing was dropped yet.
    let core = sim.core(publisher).unwrap();
    assert!(
        core.blocked_on().is_some(),
        "the publication waits for room"
    );
    assert!(!core.wants_read(StreamId::CONTROL));
    assert_eq!(sim.inner.metrics.messages_dropped.get(), 0);
    let delivered = received(&mut sim, reader).len();
    assert!(
        delivered < n,
        "the reader is held back with the stalled one"
    );

    // After the back-pressure wait, the stalled subscriber loses messages, and only it.
    sim.advance(BACKPRESSURE_WAIT * 2).await;
    assert_eq!(
        received(&mut sim, reader).len(),
        n,
        "the reader gets everything"
    );
    assert!(sim.inner.metrics.messages_dropped.get() > 0);
    let backlog = sim.backlog(stalled);
    assert!(
        backlog <= 4 * WRITE_HIGH_WATER + SOCKET_BUFFER + payload.len() + 64,
        "what the broker holds for the stalled client is bounded: {backlog}"
    );
    // When it reads again, it gets what was kept for it, in order.
    sim.get(stalled).reading = true;
    sim.drive().await;
    let got = received(&mut sim, stalled);
    assert!(!got.is_empty() && got.len() < n);
    let numbers: Vec<usize> = got
        .iter()
        .map(|m| m.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "in order");
}

/// A persistent client with a will on `will/w`, delayed `delay` seconds, whose session
/// expires after `expiry` seconds, and a watcher of `will/#`; both connected.
async fn will_setup(delay: u32, expiry: u32) -> (Sim, ClientRef, ClientRef) {
    let mut sim = Sim::new(config());
    let mut wc = persistent("w");
    wc.session_expiry_interval = expiry;
    wc.will = Some(Will {
        topic: TopicName::try_from("will/w").unwrap(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: Some(delay),
            ..WillProperties::default()
        },
    });
    let w = sim.client(wc);
    let watcher = sim.client(ClientConfig::new(id("watcher")));
    sim.connect(w);
    sim.connect(watcher);
    subscribe(&mut sim, watcher, "will/#", QoS::AtLeastOnce);
    sim.drive().await;
    (sim, w, watcher)
}

#[tokio::test(start_paused = true)]
async fn a_will_is_published_after_its_delay_and_the_session_expires_on_time() {
    let (mut sim, w, watcher) = will_setup(5, 10).await;
    sim.cut(w);
    sim.advance(Duration::from_millis(4900)).await;
    assert!(
        received(&mut sim, watcher).is_empty(),
        "not before the delay"
    );
    sim.advance(Duration::from_millis(200)).await;
    assert_eq!(received(&mut sim, watcher), ["gone"]);
    assert!(sim.inner.sessions.contains_key(&id("w")));
    sim.advance(Duration::from_secs(5)).await;
    assert!(!sim.inner.sessions.contains_key(&id("w")), "expired");
    assert_eq!(sim.inner.metrics.session_timers.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn reconnecting_within_the_will_delay_cancels_the_will_and_its_timer() {
    let (mut sim, w, watcher) = will_setup(5, 3600).await;
    sim.cut(w);
    sim.advance(Duration::from_secs(2)).await;
    assert_eq!(sim.inner.metrics.session_timers.get(), 1);
    sim.connect(w);
    sim.advance(Duration::from_secs(10)).await;
    assert_eq!(connected(&mut sim, w), 2);
    assert!(
        received(&mut sim, watcher).is_empty(),
        "the will was cancelled"
    );
    assert_eq!(sim.inner.metrics.session_timers.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_session_expires_at_its_interval_and_is_not_resumed_after() {
    let mut sim = Sim::new(config());
    let mut cc = persistent("c");
    cc.session_expiry_interval = 30;
    let c = sim.client(cc);
    sim.connect(c);
    subscribe(&mut sim, c, "t", QoS::AtLeastOnce);
    sim.drive().await;
    sim.cut(c);
    sim.advance(Duration::from_secs(29)).await;
    assert!(sim.inner.sessions.contains_key(&id("c")));
    sim.advance(Duration::from_secs(2)).await;
    assert!(!sim.inner.sessions.contains_key(&id("c")));
    sim.connect(c);
    sim.drive().await;
    let session_present: Vec<bool> = sim
        .get(c)
        .events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Connected(ack) => Some(ack.session_present),
            _ => None,
        })
        .collect();
    assert_eq!(session_present, [false, false]);
}

/// Data stream numbers for the multi-stream scenarios.
const SUB_STREAM: StreamId = StreamId::new(4);
const PUB_STREAM: StreamId = StreamId::new(8);

/// A client whose SUBSCRIBE to `a/#` goes on [`SUB_STREAM`] and whose publications go on
/// [`PUB_STREAM`]; everything else on the control stream.
fn multi_stream(sim: &mut Sim, name: &str) -> ClientRef {
    let c = sim.client(ClientConfig::new(id(name)));
    sim.get(c).router = Some(Box::new(|p: &Packet| match p {
        Packet::Subscribe(s) if s.filters.iter().any(|f| f.filter.as_str() == "a/#") => {
            Some(SUB_STREAM)
        }
        Packet::Publish(_) => Some(PUB_STREAM),
        _ => None,
    }));
    c
}

#[tokio::test(start_paused = true)]
async fn answers_and_deliveries_go_on_the_stream_they_belong_to() {
    let mut sim = Sim::new(config());
    let m = multi_stream(&mut sim, "m");
    sim.connect(m);
    subscribe(&mut sim, m, "a/#", QoS::AtLeastOnce);
    subscribe(&mut sim, m, "b/#", QoS::AtLeastOnce);
    sim.drive().await;
    // Streams are independent: the order between them is not fixed, the stream of each is.
    let mut subacks: Vec<(u16, StreamId)> = packets(&mut sim, m, PacketType::SubAck)
        .into_iter()
        .filter_map(|(s, p)| match p {
            Packet::SubAck(ack) => Some((ack.packet_id.get(), s)),
            _ => None,
        })
        .collect();
    subacks.sort();
    assert_eq!(subacks, [(1, SUB_STREAM), (2, StreamId::CONTROL)]);

    publish(&mut sim, m, "a/1", "a1", QoS::AtLeastOnce);
    publish(&mut sim, m, "b/1", "b1", QoS::AtLeastOnce);
    sim.drive().await;
    let pubacks: Vec<StreamId> = packets(&mut sim, m, PacketType::PubAck)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        pubacks,
        [PUB_STREAM, PUB_STREAM],
        "acks on the stream of the PUBLISH"
    );
    let mut deliveries: Vec<(StreamId, String)> = packets(&mut sim, m, PacketType::Publish)
        .into_iter()
        .filter_map(|(s, p)| match p {
            Packet::Publish(p) => Some((s, p.topic.as_str().to_owned())),
            _ => None,
        })
        .collect();
    deliveries.sort();
    assert_eq!(
        deliveries,
        [
            (StreamId::CONTROL, "b/1".to_owned()),
            (SUB_STREAM, "a/1".to_owned())
        ],
        "deliveries on the stream of their subscription"
    );

    // The subscription's stream ends: its messages move to the control stream.
    let t = now();
    sim.get(m).conn.stream_lost(t, SUB_STREAM);
    sim.lose_stream(m, SUB_STREAM);
    publish(&mut sim, m, "a/2", "a2", QoS::AtLeastOnce);
    sim.drive().await;
    let last = packets(&mut sim, m, PacketType::Publish).pop().unwrap();
    assert_eq!(last.0, StreamId::CONTROL);
    let mut got = received(&mut sim, m);
    got.sort();
    assert_eq!(got, ["a1", "a2", "b1"]);
}

#[tokio::test(start_paused = true)]
async fn a_malformed_packet_resets_its_data_stream_and_what_was_owed_on_it_moves() {
    let mut sim = Sim::new(config());
    let m = multi_stream(&mut sim, "m");
    let p = sim.client(ClientConfig::new(id("p")));
    sim.connect(m);
    sim.connect(p);
    subscribe(&mut sim, m, "a/#", QoS::AtLeastOnce);
    sim.drive().await;
    // A QoS 1 delivery on the subscription's stream that the client has not read yet.
    sim.get(m).reading = false;
    publish(&mut sim, p, "a/1", "a1", QoS::AtLeastOnce);
    sim.drive().await;
    // Packet type 0 does not exist.
    sim.send_bytes(m, SUB_STREAM, &[0x00, 0x00]);
    sim.drive().await;
    assert!(sim.is_linked(m), "the connection goes on");
    assert_eq!(sim.inner.metrics.protocol_errors.get(), 1);
    sim.get(m).reading = true;
    publish(&mut sim, p, "a/2", "a2", QoS::AtLeastOnce);
    sim.drive().await;
    let streams: Vec<StreamId> = packets(&mut sim, m, PacketType::Publish)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        streams,
        [StreamId::CONTROL, StreamId::CONTROL],
        "the unread delivery is resent on the control stream, and later ones follow it"
    );
    assert_eq!(received(&mut sim, m), ["a1", "a2"], "each exactly once");
}

#[tokio::test(start_paused = true)]
async fn a_publication_waiting_for_room_pauses_its_stream_only() {
    let mut sim = Sim::new(config());
    let stalled = sim.client(ClientConfig::new(id("stalled")));
    sim.connect(stalled);
    subscribe(&mut sim, stalled, "t", QoS::AtMostOnce);
    let m = multi_stream(&mut sim, "m");
    sim.connect(m);
    sim.drive().await;
    sim.get(stalled).reading = false;
    let payload = "x".repeat(1000);
    // More than the stalled session's mailbox takes at once.
    for i in 0..3000 {
        publish(&mut sim, m, "t", &format!("{i} {payload}"), QoS::AtMostOnce);
    }
    sim.drive().await;
    let core = sim.core(m).unwrap();
    assert!(core.blocked_on().is_some());
    assert!(!core.wants_read(PUB_STREAM), "the publishing stream waits");
    assert!(
        core.wants_read(StreamId::CONTROL),
        "the control stream does not"
    );
    sim.send_raw(m, StreamId::CONTROL, &Packet::PingReq);
    sim.drive().await;
    let pings = packets(&mut sim, m, PacketType::PingResp);
    assert_eq!(
        pings.len(),
        1,
        "PINGREQ is answered while a data stream waits"
    );
    assert_eq!(pings[0].0, StreamId::CONTROL);
    assert!(sim.core(m).unwrap().blocked_on().is_some(), "still waiting");
}

#[tokio::test(start_paused = true)]
async fn an_acknowledgement_waiting_for_storage_holds_its_own_stream_only() {
    let mut sim = Sim::new(config());
    let m = multi_stream(&mut sim, "m");
    sim.connect(m);
    sim.drive().await;
    sim.auto_durable = false;
    // A retained QoS 1 publication on a data stream: its PUBACK waits for the retained
    // message to be durable.
    let retained = Message::new(
        TopicName::try_from("r").unwrap(),
        b"x".to_vec(),
        QoS::AtLeastOnce,
        true,
    );
    let _ = sim.get(m).conn.publish(now(), Arc::new(retained)).unwrap();
    sim.drive().await;
    assert_eq!(sim.storage.pending(), ["retain r"]);
    assert!(packets(&mut sim, m, PacketType::PubAck).is_empty());
    // The control stream is not held by it.
    sim.send_raw(m, StreamId::CONTROL, &Packet::PingReq);
    sim.drive().await;
    let pings = packets(&mut sim, m, PacketType::PingResp);
    assert_eq!(
        pings.len(),
        1,
        "PINGRESP while the data stream's PUBACK waits"
    );
    assert!(packets(&mut sim, m, PacketType::PubAck).is_empty());
    sim.storage.make_durable();
    sim.drive().await;
    let acks: Vec<StreamId> = packets(&mut sim, m, PacketType::PubAck)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(acks, [PUB_STREAM]);
}

/// A QoS 1 or 2 publication read on a data stream waits for storage; the stream is lost (at
/// both ends) before the watermark covers the change, and the acknowledgement held on it goes
/// with it. The client resends the publication on the control stream, as a multi-stream
/// client does with what it sent on a lost stream: the acknowledgement goes on the control
/// stream, once, and only once the lost stream's change is durable. For QoS 2 the broker
/// knows the packet identifier and answers the resend at once, with nothing new to store: the
/// control stream waits for the lost stream's change (`ConnectionCore::stream_lost` merges
/// it into the control stream's), else the PUBREC would come first.
async fn ack_owed_on_a_lost_stream(qos: QoS, ack: PacketType) {
    let mut sim = Sim::new(config());
    let m = multi_stream(&mut sim, "m");
    sim.connect(m);
    sim.drive().await;
    sim.auto_durable = false;
    // Retained, so that its acknowledgement waits for the retained message to be durable.
    let retained = Message::new(TopicName::try_from("r").unwrap(), b"x".to_vec(), qos, true);
    let _ = sim.get(m).conn.publish(now(), Arc::new(retained)).unwrap();
    sim.drive().await;
    assert_eq!(sim.storage.pending(), ["retain r"]);
    assert!(packets(&mut sim, m, ack).is_empty());

    let t = now();
    sim.get(m).conn.stream_lost(t, PUB_STREAM);
    sim.lose_stream(m, PUB_STREAM);
    // The sim's client routes by packet kind, so its own machine did not see the PUBLISH go
    // on the lost stream: the resend (the client's first packet identifier) is written here.
    let resent = Publish {
        dup: true,
        qos,
        retain: true,
        topic: TopicName::try_from("r").unwrap(),
        packet_id: Some(PacketId::MIN),
        properties: PublishProperties::default(),
        payload: Bytes::from_static(b"x"),
    };
    sim.send_raw(m, StreamId::CONTROL, &Packet::Publish(resent));
    // Time passes: still no acknowledgement.
    sim.advance(Duration::from_secs(5)).await;
    assert!(
        packets(&mut sim, m, ack).is_empty(),
        "{ack:?} before the change it acknowledges is durable"
    );

    sim.storage.make_durable();
    sim.advance(Duration::from_secs(5)).await;
    let acks: Vec<StreamId> = packets(&mut sim, m, ack)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        acks,
        [StreamId::CONTROL],
        "one {ack:?}, on the control stream"
    );
    let delivered = sim
        .get(m)
        .events
        .iter()
        .filter(|e| matches!(e, ClientEvent::Delivered { reason, .. } if !reason.is_error()))
        .count();
    assert_eq!(delivered, 1);
}

#[tokio::test(start_paused = true)]
async fn a_puback_owed_on_a_lost_stream_still_waits_for_storage() {
    ack_owed_on_a_lost_stream(QoS::AtLeastOnce, PacketType::PubAck).await;
}

#[tokio::test(start_paused = true)]
async fn a_pubrec_owed_on_a_lost_stream_still_waits_for_storage() {
    ack_owed_on_a_lost_stream(QoS::ExactlyOnce, PacketType::PubRec).await;
}

/// The data stream is lost after its PUBLISH was read but before the core acted on it (data
/// and a stream reset arriving together): the change then counts as the control stream's,
/// so the PUBACK the protocol core moved to the control stream waits for it.
#[tokio::test(start_paused = true)]
async fn a_stream_lost_before_its_publication_is_processed_still_waits_for_storage() {
    let mut sim = Sim::new(config());
    let m = multi_stream(&mut sim, "m");
    sim.connect(m);
    sim.drive().await;
    sim.auto_durable = false;
    let retained = Message::new(
        TopicName::try_from("r").unwrap(),
        b"x".to_vec(),
        QoS::AtLeastOnce,
        true,
    );
    let t = now();
    let _ = sim.get(m).conn.publish(t, Arc::new(retained)).unwrap();
    let (_, packet) = sim
        .get(m)
        .conn
        .poll_transmit_tagged(t)
        .expect("the PUBLISH");
    let link = sim.clients[m.0].link.as_mut().expect("connected");
    link.core.handle_packet(t, PUB_STREAM, packet);
    sim.get(m).conn.stream_lost(t, PUB_STREAM);
    sim.lose_stream(m, PUB_STREAM);
    sim.advance(Duration::from_secs(5)).await;
    assert_eq!(sim.storage.pending(), ["retain r"]);
    assert!(
        packets(&mut sim, m, PacketType::PubAck).is_empty(),
        "a PUBACK before the change it acknowledges is durable"
    );
    sim.storage.make_durable();
    sim.advance(Duration::from_secs(5)).await;
    let acks: Vec<StreamId> = packets(&mut sim, m, PacketType::PubAck)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(acks, [StreamId::CONTROL]);
}
