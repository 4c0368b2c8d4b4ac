//! Stream rules of MQTT over QUIC in multi-stream mode, on the server state machine: a control
//! stream plus data streams, acknowledgements on the stream of the packet they answer,
//! deliveries on the stream of their subscription, topic aliases per stream, packet
//! identifiers per session, a lost data stream moving what it owed to the control stream, and a
//! resumed session delivering on the control stream. Time is passed in; nothing sleeps.

mod common;

use std::time::Instant;

use common::*;
use mqttd_proto::client::{ClientConfig, ClientConnection, Event as ClientEvent};
use mqttd_proto::server::{Accept, Event, ServerConfig, ServerConnection};
use mqttd_proto::session::{Enqueued, QueueLimits, Session};
use mqttd_proto::{
    ConnAck, ConnAckProperties, Packet, ProtocolVersion, PubResponse, Publish, QoS,
    ReasonCode as R, StreamId,
};

const Q0: QoS = QoS::AtMostOnce;
const Q1: QoS = QoS::AtLeastOnce;
const Q2: QoS = QoS::ExactlyOnce;
const CONTROL: StreamId = StreamId::CONTROL;
const S1: StreamId = StreamId::new(4);
const S2: StreamId = StreamId::new(8);

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// A server connection and its virtual clock.
struct Conn {
    clock: Clock,
    server: ServerConnection,
    /// What the server sent right after CONNACK: the flows of a resumed session.
    resumed: Vec<(StreamId, Packet)>,
}

impl Conn {
    /// A v5 client connected on the control stream with a topic alias maximum of 10 both ways
    /// and `receive_maximum`, resuming `session` if given.
    fn connect(receive_maximum: u16, session: Option<Session>) -> Self {
        let clock = Clock::new();
        let now = clock.t0();
        let mut server = ServerConnection::new(ServerConfig::default(), now);
        let connect = ConnectBuilder::v5("c")
            .receive_maximum(receive_maximum)
            .topic_alias_maximum(10)
            .packet();
        server.handle_packet(now, connect);
        assert!(matches!(server.poll_event(), Some(Event::Connect(_))));
        let present = session.is_some();
        let session =
            session.unwrap_or_else(|| Session::new(client_id("c"), 0, QueueLimits::default()));
        server.accept(now, Accept::new(session, present)).unwrap();
        let mut conn = Self {
            clock,
            server,
            resumed: Vec::new(),
        };
        let mut out = conn.transmits();
        assert!(
            matches!(out.first(), Some((CONTROL, Packet::ConnAck(a))) if a.reason == R::Success),
            "{out:?}"
        );
        conn.resumed = out.split_off(1);
        conn
    }

    fn now(&self) -> Instant {
        self.clock.t0()
    }

    /// Handles `packet` as received on `stream`.
    fn on(&mut self, stream: StreamId, packet: Packet) {
        let now = self.now();
        self.server.handle_packet_on(now, stream, packet);
    }

    /// Everything the server wants sent, with its stream.
    fn transmits(&mut self) -> Vec<(StreamId, Packet)> {
        std::iter::from_fn(|| self.server.poll_transmit_tagged()).collect()
    }

    /// Every event, with the stream of the packet that caused it.
    fn events(&mut self) -> Vec<(StreamId, Event)> {
        std::iter::from_fn(|| self.server.poll_event_tagged()).collect()
    }

    /// Subscribes to `f` on `stream` and checks the SUBACK comes back on it.
    fn subscribe_on(&mut self, stream: StreamId, id: u16, f: &str, qos: QoS) {
        self.on(stream, Packet::Subscribe(subscribe(id, &[(f, qos)])));
        let events = self.events();
        assert!(
            matches!(events.as_slice(), [(s, Event::Subscribe(_))] if *s == stream),
            "{events:?}"
        );
        let granted = match qos {
            Q0 => R::Success,
            Q1 => R::GrantedQoS1,
            Q2 => R::GrantedQoS2,
        };
        self.server.subscribe_ack(pid(id), vec![granted]).unwrap();
        let out = self.transmits();
        assert!(
            matches!(out.as_slice(), [(s, Packet::SubAck(a))] if *s == stream && a.packet_id == pid(id)),
            "{out:?}"
        );
    }

    fn deliver_on(&mut self, stream: StreamId, topic_name: &str, qos: QoS) -> Enqueued {
        let now = self.now();
        self.server
            .deliver_on(now, stream, delivery(topic_name, qos, "m"))
    }
}

/// The PUBLISH packets among `out`, with their stream.
fn publishes(out: &[(StreamId, Packet)]) -> Vec<(StreamId, &Publish)> {
    out.iter()
        .filter_map(|(s, p)| match p {
            Packet::Publish(p) => Some((*s, p)),
            _ => None,
        })
        .collect()
}

fn streams(out: &[(StreamId, Packet)]) -> Vec<StreamId> {
    out.iter().map(|(s, _)| *s).collect()
}

// ---------------------------------------------------------------------------------------------
// Acknowledgements on the stream of the packet they answer
// ---------------------------------------------------------------------------------------------

#[test]
fn qos1_publish_is_acknowledged_on_its_stream() {
    let mut c = Conn::connect(10, None);
    c.on(S1, Packet::Publish(publish("t/1", Q1, 1, "a")));
    c.on(CONTROL, Packet::Publish(publish("t/0", Q1, 2, "b")));
    c.on(S2, Packet::Publish(publish("t/2", Q1, 3, "c")));
    let events = c.events();
    let tags: Vec<_> = events
        .iter()
        .map(|(s, e)| match e {
            Event::Publish(p) => (*s, p.packet_id),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        tags,
        [
            (S1, Some(pid(1))),
            (CONTROL, Some(pid(2))),
            (S2, Some(pid(3)))
        ]
    );
    // The broker acknowledges in another order than the messages came.
    for id in [3, 1, 2] {
        c.server.publish_ack(pid(id), R::Success).unwrap();
    }
    let out = c.transmits();
    assert_eq!(
        out,
        [
            (S2, Packet::PubAck(PubResponse::success(pid(3)))),
            (S1, Packet::PubAck(PubResponse::success(pid(1)))),
            (CONTROL, Packet::PubAck(PubResponse::success(pid(2)))),
        ]
    );
}

#[test]
fn qos2_inbound_pubrec_and_pubcomp_go_on_the_stream_of_what_they_answer() {
    let mut c = Conn::connect(10, None);
    c.on(S1, Packet::Publish(publish("t", Q2, 7, "a")));
    assert!(matches!(c.events().as_slice(), [(S1, Event::Publish(_))]));
    c.server.publish_ack(pid(7), R::Success).unwrap();
    assert_eq!(c.transmits(), [(S1, pubrec(7))]);
    // A retransmission on another stream is answered there, and not handed on again.
    let mut dup = publish("t", Q2, 7, "a");
    dup.dup = true;
    c.on(S2, Packet::Publish(dup));
    assert!(c.events().is_empty());
    assert_eq!(c.transmits(), [(S2, pubrec(7))]);
    c.on(S1, pubrel(7));
    assert_eq!(c.transmits(), [(S1, pubcomp(7))]);
    // PUBREL for an identifier no longer known: "not found", on its own stream.
    c.on(S2, pubrel(7));
    assert_eq!(
        c.transmits(),
        [(
            S2,
            Packet::PubComp(pub_response(7, R::PacketIdentifierNotFound))
        )]
    );
}

#[test]
fn pingresp_goes_on_the_stream_of_the_pingreq() {
    let mut c = Conn::connect(10, None);
    c.on(S1, Packet::PingReq);
    c.on(CONTROL, Packet::PingReq);
    assert_eq!(
        c.transmits(),
        [(S1, Packet::PingResp), (CONTROL, Packet::PingResp)]
    );
}

#[test]
fn suback_and_unsuback_go_on_the_stream_of_their_request() {
    let mut c = Conn::connect(10, None);
    c.on(S1, Packet::Subscribe(subscribe(1, &[("a/#", Q1)])));
    c.on(S2, Packet::Subscribe(subscribe(2, &[("b/#", Q1)])));
    c.on(CONTROL, Packet::Subscribe(subscribe(3, &[("c/#", Q1)])));
    let tags: Vec<_> = c.events().into_iter().map(|(s, _)| s).collect();
    assert_eq!(tags, [S1, S2, CONTROL]);
    for id in [2, 3, 1] {
        c.server
            .subscribe_ack(pid(id), vec![R::GrantedQoS1])
            .unwrap();
    }
    let acks: Vec<_> = c
        .transmits()
        .into_iter()
        .map(|(s, p)| match p {
            Packet::SubAck(a) => (s, a.packet_id.get()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(acks, [(S2, 2), (CONTROL, 3), (S1, 1)]);

    c.on(S2, Packet::Unsubscribe(unsubscribe(4, &["b/#"])));
    assert!(matches!(
        c.events().as_slice(),
        [(S2, Event::Unsubscribe(_))]
    ));
    c.server.unsubscribe_ack(pid(4), vec![R::Success]).unwrap();
    let out = c.transmits();
    assert!(
        matches!(out.as_slice(), [(S2, Packet::UnsubAck(a))] if a.packet_id == pid(4)),
        "{out:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Deliveries on the stream of their subscription
// ---------------------------------------------------------------------------------------------

#[test]
fn deliveries_go_on_the_stream_of_their_subscription() {
    let mut c = Conn::connect(10, None);
    c.subscribe_on(S1, 1, "a", Q1);
    c.subscribe_on(S2, 2, "b", Q1);
    assert_eq!(c.deliver_on(S1, "a", Q1), Enqueued::Sent);
    assert_eq!(c.deliver_on(S2, "b", Q0), Enqueued::Sent);
    assert_eq!(c.deliver_on(CONTROL, "c", Q1), Enqueued::Sent);
    let now = c.now();
    assert_eq!(
        c.server.deliver(now, delivery("d", Q1, "m")),
        Enqueued::Sent
    );
    // A stream the client never used carries nothing: the control stream takes it.
    assert_eq!(c.deliver_on(StreamId::new(99), "e", Q1), Enqueued::Sent);
    let out = c.transmits();
    let sent: Vec<_> = publishes(&out)
        .into_iter()
        .map(|(s, p)| (s, p.packet_id.map(|id| id.get())))
        .collect();
    // Packet identifiers are per session, whatever the stream.
    assert_eq!(
        sent,
        [
            (S1, Some(1)),
            (S2, None),
            (CONTROL, Some(2)),
            (CONTROL, Some(3)),
            (CONTROL, Some(4)),
        ]
    );
}

#[test]
fn queued_deliveries_keep_their_stream() {
    let mut c = Conn::connect(1, None);
    c.subscribe_on(S1, 1, "a", Q1);
    c.subscribe_on(S2, 2, "b", Q1);
    assert_eq!(c.deliver_on(S1, "a", Q1), Enqueued::Sent);
    assert_eq!(c.deliver_on(S2, "b", Q1), Enqueued::Queued);
    assert_eq!(c.deliver_on(S1, "a", Q1), Enqueued::Queued);
    let first = c.transmits();
    assert_eq!(streams(&first), [S1]);
    // The acknowledgement may come on any stream; the next message goes on its own.
    c.on(S2, puback(1));
    let second = c.transmits();
    assert_eq!(streams(&second), [S2]);
    c.on(CONTROL, puback(2));
    assert_eq!(streams(&c.transmits()), [S1]);
}

#[test]
fn qos2_outbound_pubrel_goes_on_the_stream_of_its_publish() {
    let mut c = Conn::connect(10, None);
    c.subscribe_on(S1, 1, "a", Q2);
    assert_eq!(c.deliver_on(S1, "a", Q2), Enqueued::Sent);
    let out = c.transmits();
    assert_eq!(streams(&out), [S1]);
    // PUBREC arrives on the control stream; PUBREL still follows the PUBLISH.
    c.on(CONTROL, pubrec(1));
    assert_eq!(c.transmits(), [(S1, pubrel(1))]);
    c.on(S1, pubcomp(1));
    let events = c.events();
    assert!(
        events
            .iter()
            .any(|(_, e)| matches!(e, Event::Delivered { packet_id, .. } if *packet_id == pid(1))),
        "{events:?}"
    );
    assert!(c.transmits().is_empty());
}

// ---------------------------------------------------------------------------------------------
// A lost data stream
// ---------------------------------------------------------------------------------------------

#[test]
fn a_lost_stream_moves_owed_acknowledgements_to_the_control_stream() {
    let mut c = Conn::connect(10, None);
    c.on(S1, Packet::Publish(publish("t", Q1, 1, "a")));
    c.on(S1, Packet::Publish(publish("t", Q2, 2, "b")));
    c.on(S1, Packet::Subscribe(subscribe(3, &[("x", Q1)])));
    c.on(S1, Packet::Unsubscribe(unsubscribe(4, &["y"])));
    c.on(S2, Packet::Publish(publish("t", Q1, 5, "c")));
    c.on(S1, Packet::PingReq);
    assert_eq!(c.events().len(), 5);
    // The PINGRESP was not taken by the driver before the stream went.
    let now = c.now();
    c.server.stream_lost(now, S1);
    assert!(
        c.server.is_connected(),
        "a lost data stream is not a lost connection"
    );
    assert_eq!(c.transmits(), [(CONTROL, Packet::PingResp)]);
    for id in [1, 2, 5] {
        c.server.publish_ack(pid(id), R::Success).unwrap();
    }
    c.server
        .subscribe_ack(pid(3), vec![R::GrantedQoS1])
        .unwrap();
    c.server.unsubscribe_ack(pid(4), vec![R::Success]).unwrap();
    let out = c.transmits();
    assert_eq!(streams(&out), [CONTROL, CONTROL, S2, CONTROL, CONTROL]);
    assert!(matches!(
        out.as_slice(),
        [
            (_, Packet::PubAck(_)),
            (_, Packet::PubRec(_)),
            (_, Packet::PubAck(_)),
            (_, Packet::SubAck(_)),
            (_, Packet::UnsubAck(_)),
        ]
    ));
    // The PUBREL for the QoS 2 message then comes on the control stream and is answered there.
    c.on(CONTROL, pubrel(2));
    assert_eq!(c.transmits(), [(CONTROL, pubcomp(2))]);
}

#[test]
fn a_lost_stream_moves_its_deliveries_to_the_control_stream() {
    let mut c = Conn::connect(3, None);
    c.subscribe_on(S1, 1, "a", Q2);
    c.subscribe_on(S2, 2, "b", Q1);
    // Two flows on S1, taken by the driver; then the PUBREL of the first and a PUBLISH on S2,
    // not taken yet when S1 goes; one more message for S1 queued behind the window.
    assert_eq!(c.deliver_on(S1, "a", Q2), Enqueued::Sent);
    assert_eq!(c.deliver_on(S1, "a", Q1), Enqueued::Sent);
    assert_eq!(streams(&c.transmits()), [S1, S1]);
    c.on(S1, pubrec(1));
    assert_eq!(c.deliver_on(S2, "b", Q1), Enqueued::Sent);
    assert_eq!(c.deliver_on(S1, "a", Q1), Enqueued::Queued);
    let now = c.now();
    c.server.stream_lost(now, S1);
    let out = c.transmits();
    // The flows of S1 are resent on the control stream, in order: PUBREL, then PUBLISH with
    // DUP; S2's PUBLISH, not yet taken, stays on S2.
    assert_eq!(streams(&out), [S2, CONTROL, CONTROL], "{out:?}");
    assert!(matches!(&out[1].1, Packet::PubRel(r) if r.packet_id == pid(1)));
    let resent = publishes(&out);
    assert!(resent[1].1.dup && resent[1].1.packet_id == Some(pid(2)));
    // Topic aliases of the control stream: the topic is named again.
    assert_eq!(resent[1].1.topic.as_str(), "a");
    // The flows continue on the control stream.
    c.on(CONTROL, pubcomp(1));
    let next = c.transmits();
    assert_eq!(streams(&next), [CONTROL], "the queued message: {next:?}");
    c.on(S2, puback(2));
    c.on(CONTROL, puback(3));
    assert!(c.transmits().is_empty());
    // Later deliveries for the subscription made on S1 go on the control stream too.
    assert_eq!(c.deliver_on(S1, "a", Q0), Enqueued::Sent);
    assert_eq!(streams(&c.transmits()), [CONTROL]);
}

#[test]
fn losing_the_control_stream_loses_the_connection() {
    let mut c = Conn::connect(10, None);
    let now = c.now();
    c.server.stream_lost(now, CONTROL);
    assert!(c.server.is_closed());
    assert!(c.events().iter().any(|(s, e)| *s == CONTROL
        && matches!(
            e,
            Event::Closed {
                by_client: true,
                ..
            }
        )));
}

#[test]
fn a_stream_lost_before_connack_still_gets_its_answers_on_the_control_stream() {
    let clock = Clock::new();
    let now = clock.t0();
    let mut server = ServerConnection::new(ServerConfig::default(), now);
    server.handle_packet(now, ConnectBuilder::v5("c").packet());
    server.handle_packet_on(now, S1, Packet::Publish(publish("t", Q1, 1, "a")));
    server.handle_packet_on(now, S1, Packet::PingReq);
    server.stream_lost(now, S1);
    assert!(matches!(server.poll_event(), Some(Event::Connect(_))));
    let session = Session::new(client_id("c"), 0, QueueLimits::default());
    server.accept(now, Accept::new(session, false)).unwrap();
    let out: Vec<_> = std::iter::from_fn(|| server.poll_transmit_tagged()).collect();
    assert!(matches!(
        out.as_slice(),
        [(CONTROL, Packet::ConnAck(_)), (CONTROL, Packet::PingResp)]
    ));
    // Replayed after CONNACK, and then the control stream's like everything of S1.
    let events: Vec<_> = std::iter::from_fn(|| server.poll_event_tagged()).collect();
    assert!(matches!(events.as_slice(), [(CONTROL, Event::Publish(_))]));
    server.publish_ack(pid(1), R::Success).unwrap();
    assert_eq!(server.poll_transmit_tagged(), Some((CONTROL, puback(1))));
}

#[test]
fn events_of_a_lost_stream_not_yet_taken_are_the_control_streams() {
    let mut c = Conn::connect(10, None);
    c.on(S1, Packet::Publish(publish("t", Q1, 1, "a")));
    c.on(S2, Packet::Publish(publish("t", Q1, 2, "b")));
    c.on(S1, Packet::Subscribe(subscribe(3, &[("x", Q1)])));
    c.on(S1, Packet::Unsubscribe(unsubscribe(4, &["y"])));
    // Taken before the stream went: keeps its stream.
    assert!(matches!(
        c.server.poll_event_tagged(),
        Some((S1, Event::Publish(_)))
    ));
    let now = c.now();
    c.server.stream_lost(now, S1);
    let events = c.events();
    assert!(
        matches!(
            events.as_slice(),
            [
                (S2, Event::Publish(_)),
                (CONTROL, Event::Subscribe(_)),
                (CONTROL, Event::Unsubscribe(_)),
            ]
        ),
        "{events:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Topic aliases per stream
// ---------------------------------------------------------------------------------------------

fn topics_of(events: Vec<(StreamId, Event)>) -> Vec<(StreamId, String)> {
    events
        .into_iter()
        .map(|(s, e)| match e {
            Event::Publish(p) => (s, p.message.topic.as_str().to_owned()),
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn inbound_aliases_are_per_stream() {
    let mut c = Conn::connect(10, None);
    c.on(S1, Packet::Publish(publish_aliased("one", 1, Q0, 0, "")));
    c.on(S2, Packet::Publish(publish_aliased("two", 1, Q0, 0, "")));
    c.on(S1, Packet::Publish(publish_aliased("", 1, Q0, 0, "")));
    c.on(S2, Packet::Publish(publish_aliased("", 1, Q0, 0, "")));
    assert_eq!(
        topics_of(c.events()),
        [
            (S1, "one".to_owned()),
            (S2, "two".to_owned()),
            (S1, "one".to_owned()),
            (S2, "two".to_owned()),
        ]
    );
    // An alias set on S1 means nothing on the control stream.
    c.on(CONTROL, Packet::Publish(publish_aliased("", 1, Q0, 0, "")));
    assert!(c.server.is_closed());
    let out = c.transmits();
    assert!(
        matches!(out.as_slice(), [(CONTROL, Packet::Disconnect(d))] if d.reason == R::ProtocolError),
        "{out:?}"
    );
}

#[test]
fn inbound_aliases_of_a_lost_stream_are_forgotten() {
    let mut c = Conn::connect(10, None);
    c.on(S1, Packet::Publish(publish_aliased("one", 1, Q0, 0, "")));
    let now = c.now();
    c.server.stream_lost(now, S1);
    // The same stream number again (a transport that reuses numbers) starts with no aliases.
    c.on(S1, Packet::Publish(publish_aliased("", 1, Q0, 0, "")));
    assert!(c.server.is_closed());
}

#[test]
fn outbound_aliases_are_per_stream() {
    let mut c = Conn::connect(10, None);
    c.subscribe_on(S1, 1, "#", Q0);
    c.subscribe_on(S2, 2, "#", Q0);
    for (stream, topic_name) in [(S1, "x"), (S2, "y"), (S2, "x"), (S1, "x"), (S2, "x")] {
        assert_eq!(c.deliver_on(stream, topic_name, Q0), Enqueued::Sent);
    }
    let out = c.transmits();
    let sent: Vec<_> = publishes(&out)
        .into_iter()
        .map(|(s, p)| {
            let alias = p.properties.topic_alias.map(|a| a.get());
            (s, p.topic.as_str().to_owned(), alias)
        })
        .collect();
    assert_eq!(
        sent,
        [
            (S1, "x".to_owned(), Some(1)),
            (S2, "y".to_owned(), Some(1)),
            // "x" is new on S2: named there, with S2's next alias.
            (S2, "x".to_owned(), Some(2)),
            (S1, String::new(), Some(1)),
            (S2, String::new(), Some(2)),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Resumed sessions
// ---------------------------------------------------------------------------------------------

#[test]
fn a_resumed_session_delivers_on_the_control_stream() {
    let mut c = Conn::connect(1, None);
    c.subscribe_on(S1, 1, "a", Q1);
    assert_eq!(c.deliver_on(S1, "a", Q1), Enqueued::Sent);
    assert_eq!(c.deliver_on(S1, "a", Q1), Enqueued::Queued);
    assert_eq!(streams(&c.transmits()), [S1]);
    let now = c.now();
    c.server.connection_lost(now);
    let session = c.server.take_session().unwrap();

    let mut c = Conn::connect(1, Some(session));
    // The in-flight message is resent on the control stream.
    assert!(
        matches!(c.resumed.as_slice(), [(CONTROL, Packet::Publish(p))] if p.dup),
        "{:?}",
        c.resumed
    );
    // The new connection uses a stream with the same number; the old hint does not apply.
    c.on(S1, Packet::PingReq);
    assert_eq!(c.transmits(), [(S1, Packet::PingResp)]);
    c.on(S1, puback(1));
    let out = c.transmits();
    assert_eq!(streams(&out), [CONTROL], "the queued message: {out:?}");
}

#[test]
fn a_resumed_session_resends_in_flight_flows_on_the_control_stream() {
    let mut c = Conn::connect(10, None);
    c.subscribe_on(S1, 1, "a", Q2);
    assert_eq!(c.deliver_on(S1, "a", Q2), Enqueued::Sent);
    assert_eq!(c.deliver_on(S1, "a", Q2), Enqueued::Sent);
    c.on(S1, pubrec(1));
    assert_eq!(streams(&c.transmits()), [S1, S1, S1]);
    let now = c.now();
    c.server.connection_lost(now);
    let session = c.server.take_session().unwrap();

    let clock = Clock::new();
    let now = clock.t0();
    let mut server = ServerConnection::new(ServerConfig::default(), now);
    server.handle_packet(now, ConnectBuilder::v5("c").clean_start(false).packet());
    assert!(matches!(server.poll_event(), Some(Event::Connect(_))));
    server.accept(now, Accept::new(session, true)).unwrap();
    let out: Vec<_> = std::iter::from_fn(|| server.poll_transmit_tagged()).collect();
    assert_eq!(streams(&out), [CONTROL, CONTROL, CONTROL]);
    assert!(matches!(
        out.as_slice(),
        [
            (_, Packet::ConnAck(_)),
            (_, Packet::PubRel(_)),
            (_, Packet::Publish(p)),
        ] if p.dup
    ));
    // The PUBREL of the resent QoS 2 message stays on the control stream too.
    server.handle_packet_on(now, S1, pubrec(2));
    assert_eq!(server.poll_transmit_tagged(), Some((CONTROL, pubrel(2))));
}

// ---------------------------------------------------------------------------------------------
// One stream: unchanged
// ---------------------------------------------------------------------------------------------

/// The same exchange through the one-stream calls and through the tagged calls on the control
/// stream gives the same bytes, all on the control stream. (That the one-stream calls send what
/// they sent before streams existed is what the other test files check, unchanged.)
#[test]
fn one_stream_use_is_the_control_stream() {
    fn run(tagged: bool) -> Vec<(StreamId, Vec<u8>)> {
        let clock = Clock::new();
        let now = clock.t0();
        let mut server = ServerConnection::new(ServerConfig::default(), now);
        let mut wire = Vec::new();
        let feed = |server: &mut ServerConnection, packet: Packet| {
            if tagged {
                server.handle_packet_on(now, CONTROL, packet);
            } else {
                server.handle_packet(now, packet);
            }
        };
        feed(
            &mut server,
            ConnectBuilder::v5("c").topic_alias_maximum(5).packet(),
        );
        server.poll_event();
        let session = Session::new(client_id("c"), 0, QueueLimits::default());
        server.accept(now, Accept::new(session, false)).unwrap();
        feed(&mut server, Packet::Subscribe(subscribe(1, &[("#", Q2)])));
        feed(
            &mut server,
            Packet::Publish(publish_aliased("p", 3, Q2, 9, "x")),
        );
        feed(
            &mut server,
            Packet::Publish(publish_aliased("", 3, Q1, 10, "y")),
        );
        while server.poll_event().is_some() {}
        server.subscribe_ack(pid(1), vec![R::GrantedQoS2]).unwrap();
        server.publish_ack(pid(9), R::Success).unwrap();
        server.publish_ack(pid(10), R::Success).unwrap();
        for _ in 0..2 {
            let d = delivery("q", Q2, "z");
            let _ = if tagged {
                server.deliver_on(now, CONTROL, d)
            } else {
                server.deliver(now, d)
            };
        }
        feed(&mut server, pubrec(1));
        feed(&mut server, pubrel(9));
        feed(&mut server, Packet::PingReq);
        let version = server.version().unwrap();
        loop {
            let Some((stream, packet)) = server.poll_transmit_tagged() else {
                break;
            };
            let mut buf = bytes::BytesMut::new();
            packet.encode(version, &mut buf).unwrap();
            wire.push((stream, buf.to_vec()));
        }
        wire
    }
    let plain = run(false);
    assert_eq!(plain.len(), 9, "{plain:?}");
    assert!(plain.iter().all(|(s, _)| *s == CONTROL));
    assert_eq!(plain, run(true));
}

// ---------------------------------------------------------------------------------------------
// The client role
// ---------------------------------------------------------------------------------------------

#[test]
fn client_acknowledges_on_the_stream_of_the_server_packet() {
    let clock = Clock::new();
    let now = clock.t0();
    let mut config = ClientConfig::new(client_id("c"));
    config.version = ProtocolVersion::V5;
    config.auto_ack = false;
    let mut client = ClientConnection::new(config, None, now);
    assert!(matches!(
        client.poll_transmit_tagged(now),
        Some((CONTROL, Packet::Connect(_)))
    ));
    client.handle_packet(
        now,
        Packet::ConnAck(ConnAck {
            session_present: false,
            reason: R::Success,
            properties: ConnAckProperties::default(),
        }),
    );
    client.handle_packet_on(now, S1, Packet::Publish(publish("t", Q2, 3, "a")));
    assert!(
        std::iter::from_fn(|| client.poll_event()).any(|e| matches!(e, ClientEvent::Publish(_)))
    );
    client.ack(pid(3), R::Success).unwrap();
    assert_eq!(client.poll_transmit_tagged(now), Some((S1, pubrec(3))));
    client.handle_packet_on(now, S2, pubrel(3));
    assert_eq!(client.poll_transmit_tagged(now), Some((S2, pubcomp(3))));
}

/// A v5 client connected (CONNECT taken) to a server with a topic alias maximum of 10 and
/// `receive_maximum`, with data streams `S1` and `S2` opened.
fn client_on_streams(receive_maximum: u16) -> (Clock, ClientConnection) {
    let clock = Clock::new();
    let now = clock.t0();
    let mut client = ClientConnection::new(ClientConfig::new(client_id("c")), None, now);
    assert!(matches!(
        client.poll_transmit_tagged(now),
        Some((CONTROL, Packet::Connect(_)))
    ));
    // One opened before CONNACK, one after: both are usable once connected.
    client.stream_opened(S1);
    let properties = ConnAckProperties {
        topic_alias_maximum: Some(10),
        receive_maximum: std::num::NonZeroU16::new(receive_maximum),
        ..ConnAckProperties::default()
    };
    client.handle_packet(
        now,
        Packet::ConnAck(ConnAck {
            session_present: false,
            reason: R::Success,
            properties,
        }),
    );
    client.stream_opened(S2);
    assert!(matches!(
        client.poll_event(),
        Some(ClientEvent::Connected(_))
    ));
    (clock, client)
}

/// Checks that a publication went out at once.
fn sent(result: Result<Enqueued, mqttd_proto::client::ClientError>) {
    assert_eq!(result, Ok(Enqueued::Sent));
}

fn client_out(client: &mut ClientConnection, now: Instant) -> Vec<(StreamId, Packet)> {
    std::iter::from_fn(|| client.poll_transmit_tagged(now)).collect()
}

#[test]
fn client_publishes_on_the_stream_it_names_and_ids_are_per_session() {
    let (clock, mut client) = client_on_streams(100);
    let now = clock.t0();
    sent(client.publish_on(now, S1, message("a", Q1, "1")));
    sent(client.publish_on(now, S2, message("b", Q1, "2")));
    sent(client.publish_on(now, S2, message("c", Q0, "3")));
    sent(client.publish(now, message("d", Q1, "4")));
    let out = client_out(&mut client, now);
    let sent = publishes(&out);
    assert_eq!(streams(&out), vec![S1, S2, S2, CONTROL]);
    let ids: Vec<_> = sent.iter().filter_map(|(_, p)| p.packet_id).collect();
    assert_eq!(ids, vec![pid(1), pid(2), pid(3)], "one identifier space");
    // The acknowledgements arrive on the streams of the publications.
    client.handle_packet_on(now, S1, puback(1));
    client.handle_packet_on(now, S2, puback(2));
    client.handle_packet(now, puback(3));
    let done = std::iter::from_fn(|| client.poll_event())
        .filter(|e| {
            matches!(
                e,
                ClientEvent::Delivered {
                    reason: R::Success,
                    ..
                }
            )
        })
        .count();
    assert_eq!(done, 3);
}

#[test]
fn client_publication_for_an_unopened_stream_goes_on_the_control_stream() {
    let (clock, mut client) = client_on_streams(100);
    let now = clock.t0();
    sent(client.publish_on(now, StreamId::new(12), message("a", Q1, "1")));
    assert_eq!(streams(&client_out(&mut client, now)), vec![CONTROL]);
}

#[test]
fn client_subscribes_on_a_data_stream_and_the_answer_comes_back_on_it() {
    let (clock, mut client) = client_on_streams(100);
    let now = clock.t0();
    let sub = vec![mqttd_proto::Subscription {
        filter: filter("t/#"),
        options: mqttd_proto::SubscriptionOptions::default(),
    }];
    let id = client
        .subscribe_on(S2, sub, mqttd_proto::SubscribeProperties::default())
        .unwrap();
    let out = client_out(&mut client, now);
    assert!(
        matches!(out.as_slice(), [(S2, Packet::Subscribe(s))] if s.packet_id == id),
        "{out:?}"
    );
    client.handle_packet_on(
        now,
        S2,
        Packet::SubAck(mqttd_proto::SubAck {
            packet_id: id,
            properties: Default::default(),
            reasons: vec![R::Success],
        }),
    );
    assert!(matches!(client.poll_event(), Some(ClientEvent::SubAck(a)) if a.packet_id == id));
    let id = client.unsubscribe_on(S2, vec![filter("t/#")]).unwrap();
    let out = client_out(&mut client, now);
    assert!(
        matches!(out.as_slice(), [(S2, Packet::Unsubscribe(u))] if u.packet_id == id),
        "{out:?}"
    );
}

#[test]
fn client_qos2_pubrel_follows_its_publish_stream() {
    let (clock, mut client) = client_on_streams(100);
    let now = clock.t0();
    sent(client.publish_on(now, S1, message("a", Q2, "1")));
    assert_eq!(streams(&client_out(&mut client, now)), vec![S1]);
    // Even a PUBREC that arrives on another stream gets its PUBREL on the flow's stream.
    client.handle_packet_on(now, S2, pubrec(1));
    assert_eq!(client_out(&mut client, now), vec![(S1, pubrel(1))]);
    client.handle_packet_on(now, S1, pubcomp(1));
    assert!(std::iter::from_fn(|| client.poll_event()).any(|e| matches!(
        e,
        ClientEvent::Delivered {
            reason: R::Success,
            ..
        }
    )));
}

#[test]
fn client_topic_aliases_are_per_stream() {
    let (clock, mut client) = client_on_streams(100);
    let now = clock.t0();
    for stream in [S1, S1, S2, S2] {
        sent(client.publish_on(now, stream, message("long/topic", Q0, "x")));
    }
    let out = client_out(&mut client, now);
    let sent: Vec<(StreamId, bool, Option<u16>)> = publishes(&out)
        .into_iter()
        .map(|(s, p)| {
            (
                s,
                p.topic.is_empty(),
                p.properties.topic_alias.map(std::num::NonZeroU16::get),
            )
        })
        .collect();
    // Each stream sets the alias with the full topic first, then uses the alias alone.
    assert_eq!(
        sent,
        vec![
            (S1, false, Some(1)),
            (S1, true, Some(1)),
            (S2, false, Some(1)),
            (S2, true, Some(1)),
        ]
    );
}

#[test]
fn client_resends_a_lost_streams_flows_on_the_control_stream() {
    let (clock, mut client) = client_on_streams(100);
    let now = clock.t0();
    sent(client.publish_on(now, S1, message("a", Q1, "1")));
    sent(client.publish_on(now, S2, message("b", Q1, "2")));
    client_out(&mut client, now);
    client.stream_lost(now, S1);
    let out = client_out(&mut client, now);
    let resent = publishes(&out);
    assert_eq!(resent.len(), 1, "{out:?}");
    assert_eq!(resent[0].0, CONTROL);
    assert!(resent[0].1.dup);
    assert_eq!(resent[0].1.packet_id, Some(pid(1)));
    // The stream is gone: what is meant for it now goes on the control stream.
    sent(client.publish_on(now, S1, message("c", Q0, "3")));
    assert_eq!(streams(&client_out(&mut client, now)), vec![CONTROL]);
}

#[test]
fn client_control_packets_stay_on_the_control_stream() {
    let (clock, mut client) = client_on_streams(100);
    client.handle_packet_on(clock.t0(), S1, Packet::Publish(publish("t", Q0, 0, "a")));
    // After a keep alive of idleness: PINGREQ on the control stream.
    let due = client.poll_timeout().unwrap();
    client.handle_timeout(due);
    assert_eq!(
        client_out(&mut client, due),
        vec![(CONTROL, Packet::PingReq)]
    );
    client.disconnect(due, R::Success, None);
    let out = client_out(&mut client, due);
    assert!(
        matches!(out.as_slice(), [(CONTROL, Packet::Disconnect(_))]),
        "{out:?}"
    );
}
