//! Scenario tests on the deterministic simulation harness in `sim/`: sessions across
//! reconnects, keep alive, wills, expiry, topic aliases, flow control, enhanced
//! authentication and protocol versions, each checked by what the applications see.

mod sim;

use std::time::Duration;

use bytes::Bytes;
use mqttd_proto::client::{ClientConfig, Event as ClientEvent};
use mqttd_proto::server::ServerConfig;
use mqttd_proto::{Message, Packet, PacketType, QoS, ReasonCode, Will, WillProperties};

use sim::*;

const SECOND: Duration = Duration::from_secs(1);

/// A broker with a persistent subscriber to `t/#` at `sub_qos` and a persistent publisher,
/// both reconnecting one second after each connection loss.
fn pubsub(sub_qos: QoS) -> (Sim, ClientRef, ClientRef) {
    let mut sim = Sim::new(ServerConfig::default());
    let subscriber = sim.add_client(persistent_config("sub", 3600));
    sim.connect_and_drive(subscriber);
    sim.subscribe(subscriber, "t/#", sub_qos);
    sim.drive();
    let publisher = sim.add_client(persistent_config("pub", 3600));
    sim.connect_and_drive(publisher);
    for c in [publisher, subscriber] {
        assert!(sim.is_connected(c));
        sim.auto_reconnect(c, Some(SECOND));
    }
    (sim, publisher, subscriber)
}

/// The distinct items of `v`, in the order of their first occurrence.
fn first_occurrences(v: &[String]) -> Vec<String> {
    let mut seen = Vec::new();
    for x in v {
        if !seen.contains(x) {
            seen.push(x.clone());
        }
    }
    seen
}

fn numbered(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i}")).collect()
}

/// Every point of the QoS 2 exchange on each hop, as (which client's link, direction, packet).
fn qos2_cut_points() -> Vec<(bool, Dir, PacketType)> {
    use Dir::{ToClient, ToServer};
    use PacketType::{PubComp, PubRec, PubRel, Publish};
    vec![
        // publisher -> broker
        (true, ToServer, Publish),
        (true, ToClient, PubRec),
        (true, ToServer, PubRel),
        (true, ToClient, PubComp),
        // broker -> subscriber
        (false, ToClient, Publish),
        (false, ToServer, PubRec),
        (false, ToClient, PubRel),
        (false, ToServer, PubComp),
    ]
}

#[test]
fn qos2_exactly_once_in_order_across_cuts_at_every_step() {
    for (on_publisher, dir, kind) in qos2_cut_points() {
        for cut in [Cut::Before, Cut::After] {
            for skip in [0, 2] {
                let (mut sim, publisher, subscriber) = pubsub(QoS::ExactlyOnce);
                let victim = if on_publisher { publisher } else { subscriber };
                sim.cut_on(
                    victim,
                    Trigger {
                        dir,
                        kind,
                        skip,
                        cut,
                    },
                );
                for m in numbered(5) {
                    let _ = sim.publish(publisher, "t/a", &m, QoS::ExactlyOnce);
                }
                sim.advance(10 * SECOND);
                let case =
                    format!("cut {cut:?} {kind:?} {dir:?} #{skip} on publisher={on_publisher}");
                let connacks = sim.connacks(victim);
                assert_eq!(connacks.len(), 2, "{case}: the link was cut once");
                assert!(connacks[1].session_present, "{case}");
                assert_eq!(sim.payloads(subscriber), numbered(5), "{case}");
            }
        }
    }
}

#[test]
fn qos2_exactly_once_in_order_under_random_cuts() {
    for seed in 1..=40 {
        let (mut sim, publisher, subscriber) = pubsub(QoS::ExactlyOnce);
        // Links of different lengths after the first reconnect, so the hops interleave.
        sim.set_latency(publisher, Duration::from_millis(3 + seed % 20));
        sim.set_latency(subscriber, Duration::from_millis(25 - seed % 20));
        sim.chaos(Some((seed, 150)));
        let mut sent = Vec::new();
        for round in 0..4 {
            for i in 0..5 {
                let m = format!("r{round}m{i}");
                if sim.is_connected(publisher) {
                    let _ = sim.publish(publisher, "t/a", &m, QoS::ExactlyOnce);
                    sent.push(m);
                }
            }
            sim.advance(3 * SECOND);
        }
        sim.chaos(None);
        sim.advance(10 * SECOND);
        let cuts = sim.connacks(publisher).len() + sim.connacks(subscriber).len() - 2;
        assert!(cuts > 0, "seed {seed}: no link was cut");
        assert_eq!(sim.payloads(subscriber), sent, "seed {seed}");
    }
}

#[test]
fn qos1_at_least_once_across_cuts() {
    use Dir::{ToClient, ToServer};
    use PacketType::{PubAck, Publish};
    let points = [
        (true, ToServer, Publish),
        (true, ToClient, PubAck),
        (false, ToClient, Publish),
        (false, ToServer, PubAck),
    ];
    for (on_publisher, dir, kind) in points {
        for cut in [Cut::Before, Cut::After] {
            let (mut sim, publisher, subscriber) = pubsub(QoS::AtLeastOnce);
            let victim = if on_publisher { publisher } else { subscriber };
            sim.cut_on(
                victim,
                Trigger {
                    dir,
                    kind,
                    skip: 1,
                    cut,
                },
            );
            for m in numbered(5) {
                let _ = sim.publish(publisher, "t/a", &m, QoS::AtLeastOnce);
            }
            sim.advance(10 * SECOND);
            let case = format!("cut {cut:?} {kind:?} {dir:?} on publisher={on_publisher}");
            assert_eq!(
                sim.connacks(victim).len(),
                2,
                "{case}: the link was cut once"
            );
            let got = sim.payloads(subscriber);
            assert_eq!(
                first_occurrences(&got),
                numbered(5),
                "{case}: none lost, first deliveries in order: {got:?}"
            );
        }
    }
    for seed in 1..=40 {
        let (mut sim, publisher, subscriber) = pubsub(QoS::AtLeastOnce);
        sim.chaos(Some((seed, 150)));
        let mut sent = Vec::new();
        for round in 0..4 {
            for i in 0..5 {
                let m = format!("r{round}m{i}");
                if sim.is_connected(publisher) {
                    let _ = sim.publish(publisher, "t/a", &m, QoS::AtLeastOnce);
                    sent.push(m);
                }
            }
            sim.advance(3 * SECOND);
        }
        sim.chaos(None);
        sim.advance(10 * SECOND);
        let got = sim.payloads(subscriber);
        assert_eq!(first_occurrences(&got), sent, "seed {seed}: {got:?}");
    }
}

const MS: Duration = Duration::from_millis(1);

/// A will on `will/{id}` with the given delay.
fn will(id: &str, delay: Option<u32>) -> Will {
    Will {
        topic: topic_name(&format!("will/{id}")),
        payload: Bytes::from(format!("{id} is gone")),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: delay,
            ..WillProperties::default()
        },
    }
}

/// A broker with a watcher subscribed to `will/#`.
fn watched() -> (Sim, ClientRef) {
    let mut sim = Sim::new(ServerConfig::default());
    let watcher = sim.add_client(ClientConfig {
        keep_alive: 0,
        ..client_config("watcher")
    });
    sim.connect_and_drive(watcher);
    sim.subscribe(watcher, "will/#", QoS::AtLeastOnce);
    sim.drive();
    (sim, watcher)
}

#[test]
fn keepalive_silent_client_is_closed_at_one_and_a_half_keep_alive() {
    let (mut sim, watcher) = watched();
    let silent = sim.add_client(ClientConfig {
        keep_alive: 10,
        will: Some(will("silent", None)),
        ..client_config("silent")
    });
    sim.connect_and_drive(silent);
    assert!(sim.is_connected(silent));
    sim.stall(silent, Dir::ToServer, true);
    let (last_heard, _) = *sim
        .received_on_wire(silent, Dir::ToServer)
        .last()
        .expect("CONNECT arrived");
    let deadline = last_heard + Duration::from_secs(15);

    sim.advance_until(deadline - MS);
    assert!(
        sim.broker.is_online("silent"),
        "closed before 1.5 x keep alive"
    );
    assert!(sim.received(watcher).is_empty());
    sim.advance_until(deadline);
    assert!(
        !sim.broker.is_online("silent"),
        "still open at 1.5 x keep alive"
    );
    sim.drive();
    assert_eq!(
        sim.received(watcher),
        vec![("will/silent".to_string(), Bytes::from("silent is gone"))]
    );
    assert_eq!(sim.broker.wills()[0].0, deadline);
    assert!(sim.broker.log.contains(&(
        deadline,
        BrokerLog::Closed {
            client: Some(cid("silent")),
            reason: ReasonCode::KeepAliveTimeout,
            by_client: false,
        }
    )));
    // The server told the client why (the client-to-server direction is the stalled one).
    assert_eq!(
        sim.closes(silent),
        vec![(ReasonCode::KeepAliveTimeout, true)]
    );
}

#[test]
fn keepalive_client_detects_a_silent_server() {
    let (mut sim, watcher) = watched();
    let client = sim.add_client(ClientConfig {
        keep_alive: 10,
        will: Some(will("client", None)),
        ..client_config("client")
    });
    sim.connect_and_drive(client);
    sim.stall(client, Dir::ToClient, true);
    // The client pings after a keep alive of silence; the server answers, but nothing arrives.
    sim.advance(Duration::from_secs(12));
    let pings: Vec<_> = sim
        .received_on_wire(client, Dir::ToServer)
        .into_iter()
        .filter(|(_, p)| *p == Packet::PingReq)
        .collect();
    assert_eq!(pings.len(), 1, "one PINGREQ after 10 s of idleness");
    let ping_sent = pings[0].0 - LATENCY;
    sim.advance_until(ping_sent + Duration::from_secs(10) - MS);
    assert!(
        sim.is_connected(client),
        "closed before the PINGRESP was overdue"
    );
    sim.advance_until(ping_sent + Duration::from_secs(10));
    assert!(!sim.is_connected(client));
    assert_eq!(
        sim.closes(client),
        vec![(ReasonCode::KeepAliveTimeout, false)]
    );
    // Its DISCONNECT 0x8D still reaches the server, which publishes the will.
    sim.drive();
    assert!(!sim.broker.is_online("client"));
    assert_eq!(sim.payloads(watcher), vec!["client is gone"]);
}

/// A persistent client with a will, connected, and the watcher.
fn will_setup(delay: Option<u32>, expiry: u32) -> (Sim, ClientRef, ClientRef) {
    let (mut sim, watcher) = watched();
    let client = sim.add_client(ClientConfig {
        will: Some(will("w", delay)),
        keep_alive: 0,
        ..persistent_config("w", expiry)
    });
    sim.connect_and_drive(client);
    assert!(sim.is_connected(client));
    (sim, client, watcher)
}

#[test]
fn will_is_published_after_its_delay() {
    let (mut sim, client, watcher) = will_setup(Some(5), 60);
    sim.cut(client);
    let lost = sim.now();
    sim.advance(Duration::from_secs(5) - MS);
    assert!(sim.received(watcher).is_empty(), "will before its delay");
    sim.advance(MS + LATENCY);
    assert_eq!(sim.payloads(watcher), vec!["w is gone"]);
    assert_eq!(sim.broker.wills()[0].0, lost + Duration::from_secs(5));
    // The session outlives the will.
    assert!(sim.broker.stored_session("w").is_some());
}

#[test]
fn will_is_not_published_when_the_client_reconnects_within_the_delay() {
    let (mut sim, client, watcher) = will_setup(Some(5), 60);
    sim.cut(client);
    sim.advance(Duration::from_secs(3));
    sim.connect_and_drive(client);
    assert!(sim.connacks(client)[1].session_present);
    sim.advance(Duration::from_secs(100));
    assert!(sim.received(watcher).is_empty());
    assert!(sim.broker.wills().is_empty());
}

#[test]
fn will_is_published_at_session_expiry_when_that_comes_first() {
    let (mut sim, client, watcher) = will_setup(Some(30), 5);
    sim.cut(client);
    let lost = sim.now();
    sim.advance(Duration::from_secs(5) - MS);
    assert!(sim.received(watcher).is_empty());
    sim.advance(MS + LATENCY);
    assert_eq!(sim.payloads(watcher), vec!["w is gone"]);
    assert_eq!(sim.broker.wills()[0].0, lost + Duration::from_secs(5));
    assert!(
        sim.broker.stored_session("w").is_none(),
        "the session expired"
    );
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.payloads(watcher).len(), 1, "published once");
}

#[test]
fn will_is_discarded_on_normal_disconnect() {
    let (mut sim, client, watcher) = will_setup(Some(0), 5);
    sim.disconnect(client, ReasonCode::Success, None);
    sim.drive();
    assert!(!sim.broker.is_online("w"));
    sim.advance(Duration::from_secs(60));
    assert!(sim.received(watcher).is_empty());
    assert!(sim.broker.wills().is_empty());
}

#[test]
fn will_is_published_on_disconnect_with_will_message() {
    for delay in [None, Some(3)] {
        let (mut sim, client, watcher) = will_setup(delay, 60);
        sim.disconnect(client, ReasonCode::DisconnectWithWillMessage, None);
        let sent = sim.now();
        sim.drive();
        sim.advance(Duration::from_secs(10));
        assert_eq!(sim.payloads(watcher), vec!["w is gone"], "delay {delay:?}");
        let delay = Duration::from_secs(delay.unwrap_or(0).into());
        assert_eq!(sim.broker.wills()[0].0, sent + LATENCY + delay);
    }
}

#[test]
fn session_expiry_keeps_queued_messages_until_it_expires() {
    let (mut sim, publisher, subscriber) = pubsub(QoS::AtLeastOnce);
    sim.auto_reconnect(subscriber, None);
    // The subscriber's session lives 30 s after it goes away.
    sim.disconnect(subscriber, ReasonCode::Success, Some(30));
    sim.drive();
    for m in numbered(3) {
        let _ = sim.publish(publisher, "t/a", &m, QoS::AtLeastOnce);
    }
    sim.drive();
    let queued = sim
        .broker
        .stored_session("sub")
        .expect("stored")
        .queued()
        .count();
    assert_eq!(queued, 3);

    sim.advance(Duration::from_secs(20));
    // From now on the subscriber asks for 30 s in CONNECT itself.
    sim.sim_client(subscriber).config.session_expiry_interval = 30;
    sim.connect_and_drive(subscriber);
    assert!(sim.connacks(subscriber)[1].session_present);
    assert_eq!(sim.payloads(subscriber), numbered(3));

    sim.disconnect(subscriber, ReasonCode::Success, None);
    // The expiry clock starts when the DISCONNECT reaches the server.
    let expires = sim.now() + LATENCY + Duration::from_secs(30);
    sim.drive();
    let _ = sim.publish(publisher, "t/a", "late", QoS::AtLeastOnce);
    sim.advance_until(expires - MS);
    assert!(sim.broker.stored_session("sub").is_some(), "expired early");
    sim.advance_until(expires);
    assert!(sim.broker.stored_session("sub").is_none(), "did not expire");
    sim.connect_and_drive(subscriber);
    assert!(!sim.connacks(subscriber)[2].session_present);
    // The queued message and the subscription went with the session.
    let _ = sim.publish(publisher, "t/a", "after", QoS::AtLeastOnce);
    sim.drive();
    assert_eq!(sim.payloads(subscriber), numbered(3));
}

/// The PUBLISH packets of one direction of a client's links, as received: (topic, alias).
fn publishes_on_wire(sim: &Sim, c: ClientRef, dir: Dir) -> Vec<(String, Option<u16>)> {
    sim.received_on_wire(c, dir)
        .into_iter()
        .filter_map(|(_, p)| match p {
            Packet::Publish(p) => Some((
                p.topic.as_str().to_string(),
                p.properties.topic_alias.map(|a| a.get()),
            )),
            _ => None,
        })
        .collect()
}

fn s(x: &str) -> String {
    x.to_string()
}

#[test]
fn topic_aliases_client_to_server_up_to_the_server_maximum() {
    let mut sim = Sim::new(ServerConfig {
        topic_alias_maximum: 2,
        ..ServerConfig::default()
    });
    let subscriber = sim.add_client(client_config("sub"));
    sim.connect_and_drive(subscriber);
    sim.subscribe(subscriber, "t/#", QoS::AtLeastOnce);
    sim.drive();
    let publisher = sim.add_client(client_config("pub"));
    sim.connect_and_drive(publisher);
    let topics = ["t/a", "t/b", "t/a", "t/b", "t/a"];
    for (i, t) in topics.iter().enumerate() {
        let _ = sim.publish(publisher, t, &format!("{i}"), QoS::AtLeastOnce);
    }
    sim.drive();
    assert_eq!(
        publishes_on_wire(&sim, publisher, Dir::ToServer),
        vec![
            (s("t/a"), Some(1)),
            (s("t/b"), Some(2)),
            (s(""), Some(1)),
            (s(""), Some(2)),
            (s(""), Some(1)),
        ],
        "the client sets the server's two aliases, then sends empty topics"
    );
    let got: Vec<String> = sim
        .received(subscriber)
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(got, topics.map(s), "the server resolved every alias");

    // An alias above the server's maximum closes the connection with 0x94.
    sim.inject(
        publisher,
        Packet::Publish(mqttd_proto::Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic_name("t/c"),
            packet_id: None,
            properties: mqttd_proto::PublishProperties {
                topic_alias: std::num::NonZeroU16::new(3),
                ..Default::default()
            },
            payload: Bytes::from_static(b"x"),
        }),
    );
    sim.drive();
    assert_eq!(
        sim.closes(publisher),
        vec![(ReasonCode::TopicAliasInvalid, true)]
    );
    assert!(!sim.broker.is_online("pub"));
    assert_eq!(
        sim.received(subscriber).len(),
        topics.len(),
        "t/c not routed"
    );
}

#[test]
fn topic_aliases_server_to_client_when_the_client_allows_them() {
    let mut sim = Sim::new(ServerConfig::default());
    let aliased = sim.add_client(ClientConfig {
        topic_alias_maximum: 2,
        ..persistent_config("aliased", 3600)
    });
    let plain = sim.add_client(client_config("plain"));
    for c in [aliased, plain] {
        sim.connect_and_drive(c);
        sim.subscribe(c, "t/#", QoS::AtLeastOnce);
        sim.drive();
    }
    let publisher = sim.add_client(client_config("pub"));
    sim.connect_and_drive(publisher);
    let topics = ["t/a", "t/a", "t/b", "t/a", "t/c", "t/c"];
    for (i, t) in topics.iter().enumerate() {
        let _ = sim.publish(publisher, t, &format!("{i}"), QoS::AtLeastOnce);
    }
    sim.drive();
    assert_eq!(
        publishes_on_wire(&sim, aliased, Dir::ToClient),
        vec![
            (s("t/a"), Some(1)),
            (s(""), Some(1)),
            (s("t/b"), Some(2)),
            (s(""), Some(1)),
            // Both aliases are taken: the oldest is reassigned.
            (s("t/c"), Some(1)),
            (s(""), Some(1)),
        ]
    );
    assert!(
        publishes_on_wire(&sim, plain, Dir::ToClient)
            .iter()
            .all(|(t, alias)| !t.is_empty() && alias.is_none()),
        "no alias towards a client that allows none"
    );
    for c in [aliased, plain] {
        let got: Vec<String> = sim.received(c).into_iter().map(|(t, _)| t).collect();
        assert_eq!(got, topics.map(s), "the client resolved every alias");
    }

    // Aliases do not survive the connection [MQTT-3.3.2-7]: after a reconnect the topic is
    // sent again, for a resent message as for a new one.
    sim.cut_on(
        aliased,
        Trigger {
            dir: Dir::ToClient,
            kind: PacketType::Publish,
            skip: 0,
            cut: Cut::Before,
        },
    );
    sim.auto_reconnect(aliased, Some(SECOND));
    let _ = sim.publish(publisher, "t/a", "resent", QoS::AtLeastOnce);
    sim.advance(2 * SECOND);
    let _ = sim.publish(publisher, "t/a", "new", QoS::AtLeastOnce);
    sim.drive();
    let wire = publishes_on_wire(&sim, aliased, Dir::ToClient);
    assert_eq!(
        wire[wire.len() - 2..],
        [(s("t/a"), Some(1)), (s(""), Some(1))],
        "{wire:?}"
    );
    assert_eq!(
        sim.payloads(aliased)[topics.len()..],
        [s("resent"), s("new")]
    );
}

#[test]
fn receive_maximum_towards_a_slow_subscriber() {
    let mut sim = Sim::new(ServerConfig::default());
    let subscriber = sim.add_client(ClientConfig {
        receive_maximum: 3,
        auto_ack: false,
        ..client_config("sub")
    });
    sim.connect_and_drive(subscriber);
    sim.subscribe(subscriber, "t/#", QoS::ExactlyOnce);
    sim.drive();
    let publisher = sim.add_client(client_config("pub"));
    sim.connect_and_drive(publisher);
    let sent = numbered(10);
    for (i, m) in sent.iter().enumerate() {
        let qos = if i % 2 == 0 {
            QoS::AtLeastOnce
        } else {
            QoS::ExactlyOnce
        };
        let _ = sim.publish(publisher, "t/a", m, qos);
    }
    sim.drive();
    assert_eq!(
        sim.payloads(subscriber),
        sent[..3],
        "only the window is sent"
    );
    // The application acknowledges one message at a time; each frees one slot.
    let mut acked = 0;
    while acked < sent.len() {
        let pending: Vec<_> = sim
            .inbox(subscriber)
            .iter()
            .filter_map(|(_, e)| match e {
                ClientEvent::Publish(p) => p.packet_id,
                _ => None,
            })
            .skip(acked)
            .collect();
        assert!(pending.len() <= 3, "{} unacknowledged", pending.len());
        assert!(!pending.is_empty(), "stalled after {acked} acks");
        sim.client(subscriber)
            .ack(pending[0], ReasonCode::Success)
            .expect("awaiting ack");
        acked += 1;
        sim.drive();
        let expected = (acked + 3).min(sent.len());
        assert_eq!(sim.payloads(subscriber), sent[..expected]);
    }
    assert_eq!(sim.max_in_flight(subscriber, Dir::ToClient), 3);
    assert!(sim.is_connected(subscriber));
}

#[test]
fn receive_maximum_of_the_server_is_honoured_by_the_publisher() {
    let mut sim = Sim::new(ServerConfig {
        receive_maximum: 2,
        ..ServerConfig::default()
    });
    sim.broker.hold_acks = true;
    let subscriber = sim.add_client(client_config("sub"));
    sim.connect_and_drive(subscriber);
    sim.subscribe(subscriber, "t/#", QoS::ExactlyOnce);
    sim.drive();
    let publisher = sim.add_client(client_config("pub"));
    sim.connect_and_drive(publisher);
    let sent = numbered(8);
    for (i, m) in sent.iter().enumerate() {
        let qos = if i % 3 == 0 {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        };
        let _ = sim.publish(publisher, "t/a", m, qos);
    }
    let mut rounds = 0;
    loop {
        sim.drive();
        let delivered = sim.payloads(subscriber).len();
        assert!(delivered <= 2 * (rounds + 1), "window exceeded");
        if delivered == sent.len() {
            break;
        }
        rounds += 1;
        assert!(rounds < 10, "stalled at {delivered}");
        sim.release_acks();
    }
    sim.release_acks();
    sim.drive();
    assert_eq!(sim.payloads(subscriber), sent);
    assert_eq!(sim.max_in_flight(publisher, Dir::ToServer), 2);
    let kicked = sim
        .received_on_wire(publisher, Dir::ToClient)
        .into_iter()
        .any(|(_, p)| matches!(p, Packet::Disconnect(_)));
    assert!(!kicked, "the broker disconnected the publisher");
    assert!(sim.is_connected(publisher));
    assert!(sim
        .client(publisher)
        .session()
        .expect("connected")
        .in_flight()
        .next()
        .is_none());
}

fn toy_client(id: &str, initial: &'static str) -> ClientConfig {
    ClientConfig {
        authentication: Some((
            mqttd_proto::MqttStr::from_static(TOY).expect("valid"),
            Some(Bytes::from_static(initial.as_bytes())),
        )),
        ..client_config(id)
    }
}

fn add_toy_client(sim: &mut Sim, id: &str, initial: &'static str, answer: AuthAnswer) -> ClientRef {
    let c = sim.add_client(toy_client(id, initial));
    sim.sim_client(c).auth_answer = Some(answer);
    c
}

fn wrong_answer(_: &[u8]) -> Bytes {
    Bytes::from_static(b"guess")
}

/// The AUTH packets of one direction: (reason, data).
fn auths(sim: &Sim, c: ClientRef, dir: Dir) -> Vec<(ReasonCode, Option<Bytes>)> {
    sim.received_on_wire(c, dir)
        .into_iter()
        .filter_map(|(_, p)| match p {
            Packet::Auth(a) => Some((a.reason, a.properties.authentication_data)),
            _ => None,
        })
        .collect()
}

#[test]
fn enhanced_auth_challenge_response_succeeds() {
    let mut sim = Sim::new(ServerConfig::default());
    let c = add_toy_client(&mut sim, "alice", "hello", toy_answer);
    sim.connect_and_drive(c);
    assert!(sim.is_connected(c));
    let connack = &sim.connacks(c)[0];
    assert_eq!(connack.reason, ReasonCode::Success);
    assert_eq!(
        connack
            .properties
            .authentication_method
            .as_ref()
            .map(|m| m.as_str()),
        Some(TOY)
    );
    assert_eq!(
        auths(&sim, c, Dir::ToClient),
        vec![(
            ReasonCode::ContinueAuthentication,
            Some(Bytes::from("nonce-1"))
        )]
    );
    assert_eq!(
        auths(&sim, c, Dir::ToServer),
        vec![(
            ReasonCode::ContinueAuthentication,
            Some(Bytes::from("1-ecnon"))
        )]
    );
    assert!(sim
        .inbox(c)
        .iter()
        .any(|(_, e)| matches!(e, ClientEvent::AuthChallenge { .. })));
}

#[test]
fn packets_pipelined_behind_connect_wait_for_the_auth_exchange() {
    let mut sim = Sim::new(ServerConfig::default());
    let c = add_toy_client(&mut sim, "alice", "hello", toy_answer);
    sim.connect(c);
    // Subscribe and publish before anything came back: the SUBSCRIBE goes out behind CONNECT
    // and waits at the server; the PUBLISH waits in the client's session for CONNACK.
    sim.subscribe(c, "t/#", QoS::AtLeastOnce);
    let _ = sim.publish(c, "t/self", "echo", QoS::AtLeastOnce);
    sim.drive();
    assert!(sim.is_connected(c));
    assert_eq!(sim.payloads(c), vec!["echo"]);
    let order: Vec<PacketType> = sim
        .received_on_wire(c, Dir::ToServer)
        .iter()
        .map(|(_, p)| p.packet_type())
        .collect();
    assert_eq!(
        order[..4],
        [
            PacketType::Connect,
            PacketType::Subscribe,
            PacketType::Auth,
            PacketType::Publish
        ]
    );
}

#[test]
fn enhanced_auth_failures_are_refused_in_connack() {
    let cases: [(&str, &'static str, AuthAnswer, ReasonCode); 2] = [
        ("mallory", "hello", wrong_answer, ReasonCode::NotAuthorized),
        ("eve", "hi", toy_answer, ReasonCode::BadUserNameOrPassword),
    ];
    for (id, initial, answer, reason) in cases {
        let mut sim = Sim::new(ServerConfig::default());
        let c = add_toy_client(&mut sim, id, initial, answer);
        sim.connect_and_drive(c);
        let connacks = sim.connacks(c);
        assert_eq!(connacks.len(), 1, "{id}");
        assert_eq!(connacks[0].reason, reason, "{id}");
        assert!(!sim.is_connected(c), "{id}");
        assert_eq!(sim.closes(c), vec![(reason, true)], "{id}");
        assert!(!sim.broker.is_online(id));
        assert!(sim
            .broker
            .log
            .iter()
            .any(|(_, l)| *l == BrokerLog::Refused { reason }));
        assert!(
            sim.broker.stored_session(id).is_none(),
            "{id}: no session for a refused client"
        );
    }
    // An unknown method is refused at once.
    let mut sim = Sim::new(ServerConfig::default());
    let mut config = client_config("bob");
    config.authentication = Some((
        mqttd_proto::MqttStr::from_static("SCRAM").expect("valid"),
        None,
    ));
    let c = sim.add_client(config);
    sim.connect_and_drive(c);
    assert_eq!(
        sim.connacks(c)[0].reason,
        ReasonCode::BadAuthenticationMethod
    );
    assert!(auths(&sim, c, Dir::ToClient).is_empty());
}

#[test]
fn reauthentication_while_messages_keep_flowing() {
    let mut sim = Sim::new(ServerConfig::default());
    let subscriber = add_toy_client(&mut sim, "sub", "hello", toy_answer);
    sim.connect_and_drive(subscriber);
    sim.subscribe(subscriber, "t/#", QoS::ExactlyOnce);
    sim.drive();
    let publisher = add_toy_client(&mut sim, "pub", "hello", toy_answer);
    sim.connect_and_drive(publisher);
    let mut sent = Vec::new();
    // A message every 5 ms (half the latency), while both clients re-authenticate.
    for i in 0..20 {
        let m = format!("m{i}");
        let _ = sim.publish(publisher, "t/a", &m, QoS::ExactlyOnce);
        sent.push(m);
        if i == 3 {
            sim.client(publisher)
                .reauthenticate(Some(Bytes::from_static(b"hello")))
                .expect("re-authenticate");
        }
        if i == 5 {
            sim.client(subscriber)
                .reauthenticate(Some(Bytes::from_static(b"hello")))
                .expect("re-authenticate");
        }
        sim.advance(Duration::from_millis(5));
    }
    sim.drive();
    assert_eq!(sim.payloads(subscriber), sent);
    for c in [publisher, subscriber] {
        assert!(sim.is_connected(c));
        let reauthenticated = sim
            .inbox(c)
            .iter()
            .filter(|(_, e)| matches!(e, ClientEvent::ReAuthenticated { .. }))
            .count();
        assert_eq!(reauthenticated, 1);
        let to_server = auths(&sim, c, Dir::ToServer);
        assert_eq!(
            to_server.len(),
            3,
            "CONNECT answer, re-auth start, re-auth answer"
        );
        assert_eq!(to_server[1].0, ReasonCode::ReAuthenticate);
        assert_eq!(
            auths(&sim, c, Dir::ToClient).last().map(|a| a.0),
            Some(ReasonCode::Success)
        );
    }

    // A re-authentication that fails ends the connection with 0x87.
    sim.sim_client(publisher).auth_answer = Some(wrong_answer);
    sim.client(publisher)
        .reauthenticate(Some(Bytes::from_static(b"hello")))
        .expect("re-authenticate");
    sim.drive();
    assert_eq!(
        sim.closes(publisher),
        vec![(ReasonCode::NotAuthorized, true)]
    );
}

#[test]
fn message_expiry_in_an_offline_queue() {
    let (mut sim, publisher, subscriber) = pubsub(QoS::AtLeastOnce);
    sim.auto_reconnect(subscriber, None);
    sim.disconnect(subscriber, ReasonCode::Success, None);
    sim.drive();
    let now = sim.now();
    let expiring = |payload: &str, secs: Option<u64>| Message {
        expires_at: secs.map(|s| now + Duration::from_secs(s)),
        ..Message::new(
            topic_name("t/a"),
            payload.to_string(),
            QoS::AtLeastOnce,
            false,
        )
    };
    let _ = sim.publish_message(publisher, expiring("short", Some(10)));
    let _ = sim.publish_message(publisher, expiring("long", Some(100)));
    let _ = sim.publish_message(publisher, expiring("forever", None));
    sim.drive();
    assert_eq!(
        sim.broker
            .stored_session("sub")
            .expect("stored")
            .queued()
            .count(),
        3
    );

    sim.advance_until(now + Duration::from_secs(20));
    sim.connect_and_drive(subscriber);
    assert!(sim.connacks(subscriber)[1].session_present);
    assert_eq!(sim.payloads(subscriber), vec![s("long"), s("forever")]);
    // The expiry counts from when the broker received the message (one latency after `now`);
    // the subscriber gets what is left of it when the broker sends it, twenty seconds later
    // (one latency after the reconnect).
    let publishes: Vec<_> = sim
        .received_on_wire(subscriber, Dir::ToClient)
        .into_iter()
        .filter_map(|(at, p)| match p {
            Packet::Publish(p) => Some((at, p.properties.message_expiry_interval)),
            _ => None,
        })
        .collect();
    let expiry: Vec<Option<u32>> = publishes.iter().map(|(_, e)| *e).collect();
    assert_eq!(expiry, vec![Some(80), None]);
    let long = &sim.received_messages(subscriber)[0];
    assert_eq!(
        long.expires_at,
        Some(publishes[0].0 + Duration::from_secs(80))
    );
}

#[test]
fn mqtt3_clients_interoperate_with_mqtt5_clients() {
    use mqttd_proto::ProtocolVersion::{V3_1, V3_1_1, V5};
    let mut sim = Sim::new(ServerConfig::default());
    let mut clients = Vec::new();
    for (id, version) in [("v31", V3_1), ("v311", V3_1_1), ("v5", V5)] {
        let c = sim.add_client(ClientConfig {
            version,
            ..persistent_config(id, 3600)
        });
        sim.connect_and_drive(c);
        assert!(sim.is_connected(c), "{id}");
        sim.subscribe(c, "t/#", QoS::ExactlyOnce);
        sim.drive();
        clients.push((c, version));
    }
    let props = mqttd_proto::MessageProperties {
        content_type: Some(mqttd_proto::MqttStr::from_static("text/plain").expect("valid")),
        user_properties: vec![(
            mqttd_proto::MqttStr::from_static("k").expect("valid"),
            mqttd_proto::MqttStr::from_static("v").expect("valid"),
        )],
        ..Default::default()
    };
    let now = sim.now();
    // Each client publishes one message at each QoS.
    let mut sent = Vec::new();
    for &(c, version) in &clients {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let payload = format!("{version}-{}", qos.bits());
            let mut message = Message::new(topic_name("t/x"), payload.clone(), qos, false);
            if version == V5 {
                message.properties = props.clone();
                message.expires_at = Some(now + Duration::from_secs(60));
            }
            let _ = sim.publish_message(c, message);
            sent.push(payload);
            sim.drive();
        }
    }
    for &(c, version) in &clients {
        assert_eq!(sim.payloads(c), sent, "{version}");
        for m in sim.received_messages(c) {
            let from_v5 = m.payload.starts_with(b"5.0");
            if version == V5 && from_v5 {
                assert_eq!(m.properties, props);
                assert!(m.expires_at.is_some());
            } else {
                assert_eq!(m.properties, Default::default(), "{version}");
                assert_eq!(m.expires_at, None);
            }
        }
        if version != V5 {
            // What the broker wrote for an MQTT 3 receiver carries no MQTT 5 property.
            let stripped = sim
                .wire()
                .iter()
                .filter(|r| r.client == c && r.sent && r.dir == Dir::ToClient)
                .all(|r| match &r.packet {
                    Packet::Publish(p) => p.properties == Default::default(),
                    _ => true,
                });
            assert!(stripped, "{version}");
        }
    }
    // MQTT 3.1 unsubscribes (UNSUBACK without reason codes) and stops receiving.
    let (v31, _) = clients[0];
    sim.client(v31)
        .unsubscribe(vec![
            mqttd_proto::TopicFilter::try_from("t/#").expect("valid")
        ])
        .expect("unsubscribe");
    sim.drive();
    assert!(sim
        .inbox(v31)
        .iter()
        .any(|(_, e)| matches!(e, ClientEvent::UnsubAck(a) if a.reasons.is_empty())));
    // A persistent MQTT 3.1.1 session keeps QoS 1 and 2 messages while its client is away.
    let (v311, _) = clients[1];
    let (v5, _) = clients[2];
    sim.disconnect(v311, ReasonCode::Success, None);
    sim.drive();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let _ = sim.publish(v5, "t/y", &format!("offline-{}", qos.bits()), qos);
    }
    sim.drive();
    sim.connect_and_drive(v311);
    assert!(sim.connacks(v311)[1].session_present);
    assert_eq!(
        sim.payloads(v311)[sent.len()..],
        [s("offline-1"), s("offline-2")]
    );
    assert_eq!(sim.payloads(v31), sent, "nothing after UNSUBSCRIBE");
}

#[test]
fn takeover_moves_the_session_to_the_new_connection() {
    for delay in [None, Some(5)] {
        let (mut sim, watcher) = watched();
        let first = sim.add_client(ClientConfig {
            will: Some(will("dev", delay)),
            ..persistent_config("dev", 3600)
        });
        sim.connect_and_drive(first);
        sim.subscribe(first, "t/#", QoS::AtLeastOnce);
        sim.drive();
        let publisher = sim.add_client(client_config("pub"));
        sim.connect_and_drive(publisher);
        // The first connection stops reading: its messages stay in flight.
        sim.stall(first, Dir::ToClient, true);
        for m in numbered(3) {
            let _ = sim.publish(publisher, "t/a", &m, QoS::AtLeastOnce);
        }
        sim.drive();
        let second = sim.add_client(persistent_config("dev", 3600));
        sim.connect_and_drive(second);
        assert!(sim.connacks(second)[0].session_present);
        assert_eq!(
            sim.payloads(second),
            numbered(3),
            "in-flight messages resent"
        );
        sim.stall(first, Dir::ToClient, false);
        sim.advance(Duration::from_secs(10));
        assert_eq!(
            sim.closes(first),
            vec![(ReasonCode::SessionTakenOver, true)]
        );
        assert!(sim.is_connected(second));
        // The old connection's will: published at once without a delay; with one, the new
        // connection came in time.
        let wills = if delay.is_none() {
            vec![s("dev is gone")]
        } else {
            vec![]
        };
        assert_eq!(sim.payloads(watcher), wills, "will delay {delay:?}");
    }
}

#[test]
fn refusals_and_assigned_identifiers() {
    use mqttd_proto::ProtocolVersion::V3_1_1;
    let mut sim = Sim::new(ServerConfig::default());
    sim.broker.refuse.insert(cid("banned"), ReasonCode::Banned);
    sim.broker
        .refuse
        .insert(cid("old"), ReasonCode::NotAuthorized);
    let banned = sim.add_client(client_config("banned"));
    let old = sim.add_client(ClientConfig {
        version: V3_1_1,
        ..client_config("old")
    });
    for c in [banned, old] {
        sim.connect_and_drive(c);
        assert!(!sim.is_connected(c));
    }
    assert_eq!(sim.connacks(banned)[0].reason, ReasonCode::Banned);
    // MQTT 3.1.1 has return code 5, "not authorized".
    assert_eq!(sim.connacks(old)[0].reason, ReasonCode::NotAuthorized);

    let anonymous = sim.add_client(client_config(""));
    sim.connect_and_drive(anonymous);
    let assigned = sim.connacks(anonymous)[0]
        .properties
        .assigned_client_identifier
        .clone()
        .expect("an identifier is assigned");
    assert!(sim.broker.is_online(assigned.as_str()));
    assert_eq!(
        sim.client(anonymous)
            .session()
            .map(|s| s.client_id().clone()),
        Some(assigned)
    );
}

#[test]
fn qos2_exactly_once_with_manual_acks_across_cuts() {
    // A subscriber that acknowledges only after "storing" each message: the link fails after
    // a PUBLISH reached it and before it acknowledged; it acknowledges anyway, reconnects, and
    // the broker's retransmission must not reach the application a second time.
    for cut in [Cut::Before, Cut::After] {
        for kind in [PacketType::Publish, PacketType::PubRel] {
            let (mut sim, publisher, subscriber) = pubsub(QoS::ExactlyOnce);
            sim.sim_client(subscriber).config.auto_ack = false;
            sim.auto_reconnect(subscriber, None);
            sim.cut(subscriber);
            sim.connect_and_drive(subscriber);
            sim.cut_on(
                subscriber,
                Trigger {
                    dir: Dir::ToClient,
                    kind,
                    skip: 1,
                    cut,
                },
            );
            for m in numbered(4) {
                let _ = sim.publish(publisher, "t/a", &m, QoS::ExactlyOnce);
            }
            for round in 0..6 {
                sim.drive();
                let ids: Vec<_> = sim
                    .inbox(subscriber)
                    .iter()
                    .filter_map(|(_, e)| match e {
                        ClientEvent::Publish(p) => p.packet_id,
                        _ => None,
                    })
                    .collect();
                for id in ids {
                    // Already acknowledged ones are refused; that is fine.
                    let _ = sim.client(subscriber).ack(id, ReasonCode::Success);
                }
                if round == 2 {
                    sim.connect(subscriber);
                }
            }
            sim.advance(5 * SECOND);
            let case = format!("{cut:?} {kind:?}");
            assert_eq!(sim.connacks(subscriber).len(), 3, "{case}: cut once");
            assert_eq!(sim.payloads(subscriber), numbered(4), "{case}");
        }
    }
}

#[test]
fn flow_control_and_exactly_once_under_random_cuts() {
    for seed in 1..=30 {
        let mut sim = Sim::new(ServerConfig {
            receive_maximum: 3,
            ..ServerConfig::default()
        });
        let subscriber = sim.add_client(ClientConfig {
            receive_maximum: 2,
            ..persistent_config("sub", 3600)
        });
        sim.connect_and_drive(subscriber);
        sim.subscribe(subscriber, "t/#", QoS::ExactlyOnce);
        sim.drive();
        let publisher = sim.add_client(persistent_config("pub", 3600));
        sim.connect_and_drive(publisher);
        for c in [publisher, subscriber] {
            sim.auto_reconnect(c, Some(SECOND));
        }
        sim.chaos(Some((seed, 100)));
        let mut sent = Vec::new();
        for round in 0..5 {
            for i in 0..6 {
                let m = format!("r{round}m{i}");
                if sim.is_connected(publisher) {
                    let _ = sim.publish(publisher, "t/a", &m, QoS::ExactlyOnce);
                    sent.push(m);
                }
            }
            sim.advance(2 * SECOND);
        }
        sim.chaos(None);
        sim.advance(10 * SECOND);
        let cuts = sim.connacks(publisher).len() + sim.connacks(subscriber).len() - 2;
        assert!(cuts > 0, "seed {seed}: no link was cut");
        assert_eq!(sim.payloads(subscriber), sent, "seed {seed}");
        assert_eq!(
            sim.max_in_flight(subscriber, Dir::ToClient),
            2,
            "seed {seed}"
        );
        assert!(
            sim.max_in_flight(publisher, Dir::ToServer) <= 3,
            "seed {seed}"
        );
        let exceeded = sim.wire().iter().any(|r| {
            matches!(&r.packet, Packet::Disconnect(d) if d.reason == ReasonCode::ReceiveMaximumExceeded)
        });
        assert!(!exceeded, "seed {seed}: receive maximum exceeded");
    }
}
