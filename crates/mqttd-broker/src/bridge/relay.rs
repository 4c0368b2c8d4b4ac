//! What a bridge decides, sans-IO: which rule maps a message to which topic, what is owed to
//! whom, and what to send again after a reconnect. The bridge's task feeds it events from the
//! two connections and carries out the commands it queues; the unit tests below drive it by
//! hand.
//!
//! A message is acknowledged to the side it came from only once the other side has taken it:
//!
//! ```text
//!   local session --PUBLISH (id L)--> relay --PublishRemote(m)--> remote broker
//!   local session <--AckLocal(L)----- relay <--Delivered(m)------ remote broker
//!   remote broker --PUBLISH (id R)--> relay --PublishLocal(m)---> local broker
//!   remote broker <--AckRemote(R)---- relay <--Delivered(m)------ local broker
//! ```
//!
//! The `Arc` of each message handed to a connection identifies it when that connection reports
//! it delivered (the client hands the same `Arc` back), or when the client's verdict says it
//! dropped it (expired, too large): then it is done too. Messages for the remote broker that
//! wait for it to come back, or for room in its receive maximum, are kept here, bounded by the
//! local session's in-flight window: the local broker sends no more until some are
//! acknowledged. So the remote client never queues a message of the relay's, where it could
//! expire unseen.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use mqttd_proto::session::{OutboundState, Session};
use mqttd_proto::{ConnAck, InboundPublish, Message, PacketId, QoS, ReasonCode, TopicName};

use super::config::TopicRule;

/// What the driver must do, on the local connection or the remote one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    /// Publish on the other broker; a QoS 1 or 2 message's completion is reported back with
    /// this `Arc` ([`Relay::remote_delivered`], [`Relay::local_delivered`]).
    Publish(Arc<Message>),
    /// Acknowledge the message the connection delivered under this identifier.
    Ack(PacketId),
}

/// The side of the bridge a message came from.
#[derive(Debug, Clone, Copy)]
enum Side {
    Local,
    Remote,
}

/// What a broker allows, from its CONNACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) max_qos: QoS,
    pub(crate) retain: bool,
    /// QoS 1 and 2 messages it takes unacknowledged.
    pub(crate) receive_maximum: usize,
}

impl Limits {
    /// Everything MQTT allows.
    #[cfg(test)]
    pub(crate) const ALL: Self = Self {
        max_qos: QoS::ExactlyOnce,
        retain: true,
        receive_maximum: u16::MAX as usize,
    };

    /// What a CONNACK allows.
    pub(crate) fn of(ack: &ConnAck) -> Self {
        Self {
            max_qos: ack.properties.maximum_qos.unwrap_or(QoS::ExactlyOnce),
            retain: ack.properties.retain_available.unwrap_or(true),
            receive_maximum: usize::from(
                ack.properties
                    .receive_maximum
                    .map_or(u16::MAX, std::num::NonZeroU16::get),
            ),
        }
    }

    /// `message` as this broker takes it: QoS and RETAIN within its limits.
    fn fit(self, message: &Arc<Message>) -> Arc<Message> {
        if message.qos <= self.max_qos && (self.retain || !message.retain) {
            return message.clone();
        }
        let mut m = Message::clone(message);
        m.qos = m.qos.min(self.max_qos);
        m.retain &= self.retain;
        Arc::new(m)
    }
}

/// Commands a side may have waiting before QoS 0 messages for it are dropped. QoS 1 and 2
/// messages are bounded by the receive maximum each side announced; QoS 0 ones only by this,
/// so that a side that takes messages slower than the other sends them costs bounded memory
/// (the broker's own policy for QoS 0 under overload).
pub(crate) const MAX_WAITING_QOS0: usize = 1024;

/// Counts since the driver last took them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Messages the remote broker took (acknowledged, or sent at QoS 0).
    pub(crate) out: u64,
    /// Messages from the remote broker published here.
    pub(crate) in_: u64,
    /// Messages dropped: QoS 0 while the remote broker is away, no rule maps them, or a
    /// broker refused them.
    pub(crate) dropped: u64,
}

/// A message for the remote broker not yet acknowledged by it.
#[derive(Debug)]
struct Outbound {
    /// Arrival order, for sending again in order.
    seq: u64,
    message: Arc<Message>,
    /// The local session's identifier to acknowledge.
    local_id: PacketId,
    /// Whether the remote connection's client has it (else it waits in `Relay::waiting`).
    sent: bool,
}

/// A message from the remote broker not yet acknowledged by the local one.
#[derive(Debug)]
struct Inbound {
    /// Held so that its address names only it while it is pending.
    _message: Arc<Message>,
    /// The remote connection it came on: a later one has its own identifiers.
    generation: u64,
    remote_id: PacketId,
}

/// The key of a message handed to a connection: the address of its `Arc`.
fn key(message: &Arc<Message>) -> usize {
    Arc::as_ptr(message) as usize
}

/// A bridge's relay state between one local connection and successive remote ones.
#[derive(Debug)]
pub(crate) struct Relay {
    rules: Arc<[TopicRule]>,
    local: Limits,
    /// `Some` while a remote connection is up.
    remote: Option<Limits>,
    /// Counts remote connections: acknowledgements are owed to the one a message came on.
    generation: u64,
    outbound: HashMap<usize, Outbound>,
    /// The outbound messages not handed to a remote connection, by arrival.
    waiting: BTreeMap<u64, usize>,
    /// The outbound messages the remote connection's client has.
    in_client: usize,
    next_seq: u64,
    inbound: HashMap<usize, Inbound>,
    to_local: VecDeque<Command>,
    to_remote: VecDeque<Command>,
    counts: Counts,
}

impl Relay {
    /// A relay for `rules` over a local connection with `local` limits; the remote broker is
    /// away.
    pub(crate) fn new(rules: Arc<[TopicRule]>, local: Limits) -> Self {
        Self {
            rules,
            local,
            remote: None,
            generation: 0,
            outbound: HashMap::new(),
            waiting: BTreeMap::new(),
            in_client: 0,
            next_seq: 0,
            inbound: HashMap::new(),
            to_local: VecDeque::new(),
            to_remote: VecDeque::new(),
            counts: Counts::default(),
        }
    }

    /// The next command for the local connection.
    pub(crate) fn poll_local(&mut self) -> Option<Command> {
        self.to_local.pop_front()
    }

    /// The next command for the remote connection.
    pub(crate) fn poll_remote(&mut self) -> Option<Command> {
        self.to_remote.pop_front()
    }

    /// Whether commands wait for the local connection.
    pub(crate) fn has_local(&self) -> bool {
        !self.to_local.is_empty()
    }

    /// Whether commands wait for the remote connection.
    pub(crate) fn has_remote(&self) -> bool {
        !self.to_remote.is_empty()
    }

    /// Messages taken from the local session and not yet acknowledged by the remote broker.
    #[cfg(test)]
    pub(crate) fn pending_out(&self) -> usize {
        self.outbound.len()
    }

    /// The counts since the last call.
    pub(crate) fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    /// `publish`, from the side `from`, on the topic and at most at the QoS of the first rule
    /// that carries it across (`map`); with its packet id. A message no rule carries is
    /// counted as dropped and acknowledged to its side.
    fn mapped(
        &mut self,
        publish: InboundPublish,
        map: fn(&TopicRule, &TopicName) -> Option<TopicName>,
        from: Side,
    ) -> Option<(Message, Option<PacketId>)> {
        let InboundPublish {
            mut message,
            packet_id,
            ..
        } = publish;
        let Some((qos, topic)) = self
            .rules
            .iter()
            .find_map(|r| map(r, &message.topic).map(|t| (r.qos(), t)))
        else {
            self.counts.dropped += 1;
            if let Some(id) = packet_id {
                let acks = match from {
                    Side::Local => &mut self.to_local,
                    Side::Remote => &mut self.to_remote,
                };
                acks.push_back(Command::Ack(id));
            }
            return None;
        };
        message.topic = topic;
        message.qos = message.qos.min(qos);
        Some((message, packet_id))
    }

    /// A message from the local session (subscribed to the rules' local filters).
    pub(crate) fn local_message(&mut self, publish: InboundPublish) {
        // A message no rule carries out is left from an older configuration's subscription,
        // say.
        let Some((message, packet_id)) = self.mapped(publish, TopicRule::to_remote, Side::Local)
        else {
            return;
        };
        let message = Arc::new(message);
        match packet_id {
            Some(local_id) if message.qos != QoS::AtMostOnce => {
                let seq = self.next_seq;
                self.next_seq += 1;
                let k = key(&message);
                self.outbound.insert(
                    k,
                    Outbound {
                        seq,
                        message,
                        local_id,
                        sent: false,
                    },
                );
                self.waiting.insert(seq, k);
                self.send_waiting();
            }
            // QoS 0 goes now or never.
            id => {
                match self.remote {
                    Some(limits) if self.to_remote.len() < MAX_WAITING_QOS0 => {
                        self.counts.out += 1;
                        self.to_remote
                            .push_back(Command::Publish(limits.fit(&message)));
                    }
                    _ => self.counts.dropped += 1,
                }
                if let Some(id) = id {
                    self.to_local.push_back(Command::Ack(id));
                }
            }
        }
    }

    /// Hands waiting messages to the remote connection, in order, while its receive maximum
    /// has room.
    fn send_waiting(&mut self) {
        let Some(limits) = self.remote else {
            return;
        };
        while self.in_client < limits.receive_maximum {
            let Some((_, k)) = self.waiting.pop_first() else {
                return;
            };
            self.send_out(limits, k);
        }
    }

    /// Hands the pending message under `k` to the remote connection, fitted to its `limits`
    /// (a changed message is a new `Arc`, under a new key).
    fn send_out(&mut self, limits: Limits, k: usize) {
        let Some(mut entry) = self.outbound.remove(&k) else {
            return;
        };
        let message = limits.fit(&entry.message);
        if message.qos == QoS::AtMostOnce {
            // The remote broker takes no more than QoS 0: sent, and done.
            self.counts.out += 1;
            self.to_remote.push_back(Command::Publish(message));
            self.to_local.push_back(Command::Ack(entry.local_id));
            return;
        }
        entry.sent = true;
        entry.message = message.clone();
        self.in_client += 1;
        self.outbound.insert(key(&message), entry);
        self.to_remote.push_back(Command::Publish(message));
    }

    /// The remote broker finished a QoS 1 or 2 message (or, with an error, its client
    /// dropped it): the local session may forget it.
    pub(crate) fn remote_delivered(&mut self, message: &Arc<Message>, reason: ReasonCode) {
        let Some(entry) = self.outbound.remove(&key(message)) else {
            return;
        };
        if entry.sent {
            self.in_client = self.in_client.saturating_sub(1);
        } else {
            self.waiting.remove(&entry.seq);
        }
        if reason.is_error() {
            // Refused (not authorized, quota): sending it again would be refused again.
            self.counts.dropped += 1;
        } else {
            self.counts.out += 1;
        }
        self.to_local.push_back(Command::Ack(entry.local_id));
        self.send_waiting();
    }

    /// A remote connection is up with `limits`; `carried` is what its client resends from the
    /// session it resumed (see [`carried`]). Everything else pending goes now, in order.
    pub(crate) fn remote_up(&mut self, limits: Limits, carried: &HashSet<usize>) {
        self.remote = Some(limits);
        self.generation += 1;
        self.waiting.clear();
        self.in_client = 0;
        for (k, entry) in &mut self.outbound {
            entry.sent = carried.contains(k);
            if entry.sent {
                self.in_client += 1;
            } else {
                self.waiting.insert(entry.seq, *k);
            }
        }
        self.send_waiting();
    }

    /// The remote connection is gone. Its client's session keeps what it sent; what arrives
    /// from the local session meanwhile waits here.
    pub(crate) fn remote_down(&mut self) {
        self.remote = None;
        // Commands for the connection that is gone are moot: messages still pending go again
        // (see `remote_up`), and acknowledgements are owed to the old connection only.
        self.to_remote.clear();
    }

    /// A message from the remote broker (subscribed to the rules' remote filters).
    pub(crate) fn remote_message(&mut self, publish: InboundPublish) {
        let Some((message, packet_id)) = self.mapped(publish, TopicRule::to_local, Side::Remote)
        else {
            return;
        };
        let message = self.local.fit(&Arc::new(message));
        if message.qos == QoS::AtMostOnce && self.to_local.len() >= MAX_WAITING_QOS0 {
            self.counts.dropped += 1;
            if let Some(id) = packet_id {
                self.to_remote.push_back(Command::Ack(id));
            }
            return;
        }
        self.counts.in_ += 1;
        self.to_local.push_back(Command::Publish(message.clone()));
        match packet_id {
            Some(remote_id) if message.qos != QoS::AtMostOnce => {
                self.inbound.insert(
                    key(&message),
                    Inbound {
                        _message: message,
                        generation: self.generation,
                        remote_id,
                    },
                );
            }
            Some(remote_id) => self.to_remote.push_back(Command::Ack(remote_id)),
            None => {}
        }
    }

    /// The local broker finished a message the bridge published (or, with an error, the local
    /// client dropped it): the remote broker may forget it, if it is still the connection it
    /// came on.
    pub(crate) fn local_delivered(&mut self, message: &Arc<Message>, reason: ReasonCode) {
        let Some(entry) = self.inbound.remove(&key(message)) else {
            return;
        };
        if reason.is_error() {
            self.counts.dropped += 1;
        }
        if self.remote.is_some() && entry.generation == self.generation {
            self.to_remote.push_back(Command::Ack(entry.remote_id));
        }
    }
}

/// What the client resends from `session` once connected (`present`: the server kept its
/// side of the session): every flow in flight and everything queued, or, if the server lost
/// its side, what was not yet PUBREC'd (the client forgets the rest, which the relay sends
/// again).
pub(crate) fn carried(session: &Session, present: bool) -> HashSet<usize> {
    session
        .in_flight()
        .filter(|(_, f)| present || f.state == OutboundState::PublishSent)
        .map(|(_, f)| key(&f.delivery.message))
        .chain(session.queued().map(|d| key(&d.message)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqttd_proto::TopicName;

    fn rules(texts: &[&str]) -> Arc<[TopicRule]> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    fn publish(topic: &str, qos: QoS, id: u16) -> InboundPublish {
        let topic = TopicName::try_from(topic).unwrap();
        InboundPublish {
            message: Message::new(topic, &b"x"[..], qos, false),
            packet_id: PacketId::new(id),
            dup: false,
            subscription_ids: Vec::new(),
        }
    }

    fn pid(id: u16) -> PacketId {
        PacketId::new(id).unwrap()
    }

    fn drain(relay: &mut Relay) -> (Vec<Command>, Vec<Command>) {
        let mut local = Vec::new();
        while let Some(c) = relay.poll_local() {
            local.push(c);
        }
        let mut remote = Vec::new();
        while let Some(c) = relay.poll_remote() {
            remote.push(c);
        }
        (local, remote)
    }

    fn published(commands: &[Command]) -> Vec<(String, QoS)> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Publish(m) => Some((m.topic.as_str().to_owned(), m.qos)),
                Command::Ack(_) => None,
            })
            .collect()
    }

    fn up(relay: &mut Relay) {
        relay.remote_up(Limits::ALL, &HashSet::new());
    }

    #[test]
    fn outgoing_messages_are_acknowledged_locally_once_the_remote_broker_has_them() {
        let mut relay = Relay::new(rules(&["s/# out 1 local/ remote/"]), Limits::ALL);
        up(&mut relay);
        relay.local_message(publish("local/s/1", QoS::ExactlyOnce, 7));
        let (local, remote) = drain(&mut relay);
        assert!(local.is_empty(), "nothing acknowledged yet: {local:?}");
        assert_eq!(
            published(&remote),
            vec![("remote/s/1".to_owned(), QoS::AtLeastOnce)]
        );
        let Command::Publish(m) = &remote[0] else {
            unreachable!()
        };
        relay.remote_delivered(m, ReasonCode::Success);
        assert_eq!(drain(&mut relay), (vec![Command::Ack(pid(7))], vec![]));
        assert_eq!(relay.take_counts().out, 1);
        assert_eq!(relay.pending_out(), 0);
    }

    #[test]
    fn while_the_remote_broker_is_away_qos_1_waits_and_qos_0_is_dropped() {
        let mut relay = Relay::new(rules(&["# out 2"]), Limits::ALL);
        relay.local_message(publish("a", QoS::AtLeastOnce, 1));
        relay.local_message(publish("b", QoS::AtMostOnce, 0));
        relay.local_message(publish("c", QoS::ExactlyOnce, 2));
        assert_eq!(drain(&mut relay), (vec![], vec![]));
        assert_eq!(relay.take_counts().dropped, 1);
        assert_eq!(relay.pending_out(), 2);
        up(&mut relay);
        let (local, remote) = drain(&mut relay);
        assert!(local.is_empty());
        assert_eq!(
            published(&remote),
            vec![
                ("a".to_owned(), QoS::AtLeastOnce),
                ("c".to_owned(), QoS::ExactlyOnce)
            ],
            "in arrival order"
        );
    }

    #[test]
    fn a_reconnect_sends_again_only_what_the_resumed_session_does_not_carry() {
        let mut relay = Relay::new(rules(&["# out 1"]), Limits::ALL);
        up(&mut relay);
        relay.local_message(publish("a", QoS::AtLeastOnce, 1));
        relay.local_message(publish("b", QoS::AtLeastOnce, 2));
        let (_, remote) = drain(&mut relay);
        let Command::Publish(a) = remote[0].clone() else {
            unreachable!()
        };
        relay.remote_down();
        relay.local_message(publish("c", QoS::AtLeastOnce, 3));
        // The client's session carries `a` (sent on the old connection); `b` was lost with it.
        let carried = HashSet::from([key(&a)]);
        relay.remote_up(Limits::ALL, &carried);
        let (_, remote) = drain(&mut relay);
        assert_eq!(
            published(&remote),
            vec![
                ("b".to_owned(), QoS::AtLeastOnce),
                ("c".to_owned(), QoS::AtLeastOnce)
            ]
        );
        relay.remote_delivered(&a, ReasonCode::Success);
        assert_eq!(drain(&mut relay).0, vec![Command::Ack(pid(1))]);
    }

    #[test]
    fn no_more_than_the_remote_brokers_receive_maximum_is_handed_to_its_client() {
        let mut relay = Relay::new(rules(&["# out 1"]), Limits::ALL);
        let limits = Limits {
            receive_maximum: 2,
            ..Limits::ALL
        };
        relay.remote_up(limits, &HashSet::new());
        for i in 1..=4 {
            relay.local_message(publish(&format!("t{i}"), QoS::AtLeastOnce, i));
        }
        let (_, remote) = drain(&mut relay);
        assert_eq!(published(&remote).len(), 2);
        // The client dropped the first one (its verdict): done, and the third goes.
        let Command::Publish(first) = &remote[0] else {
            unreachable!()
        };
        relay.remote_delivered(first, ReasonCode::PacketTooLarge);
        let (local, remote) = drain(&mut relay);
        assert_eq!(local, vec![Command::Ack(pid(1))]);
        assert_eq!(
            published(&remote),
            vec![("t3".to_owned(), QoS::AtLeastOnce)]
        );
        assert_eq!(relay.take_counts().dropped, 1);
    }

    #[test]
    fn qos_0_beyond_what_a_slow_side_has_waiting_is_dropped() {
        let mut relay = Relay::new(rules(&["# both 1"]), Limits::ALL);
        up(&mut relay);
        for _ in 0..MAX_WAITING_QOS0 + 10 {
            relay.local_message(publish("a", QoS::AtMostOnce, 0));
            relay.remote_message(publish("b", QoS::AtMostOnce, 0));
        }
        // QoS 1 is not dropped: it is bounded by the receive maximum instead.
        relay.local_message(publish("a", QoS::AtLeastOnce, 1));
        relay.remote_message(publish("b", QoS::AtLeastOnce, 2));
        let (local, remote) = drain(&mut relay);
        assert_eq!(local.len(), MAX_WAITING_QOS0 + 1);
        assert_eq!(remote.len(), MAX_WAITING_QOS0 + 1);
        assert_eq!(relay.take_counts().dropped, 20);
    }

    #[test]
    fn messages_fit_the_remote_brokers_limits() {
        let mut relay = Relay::new(rules(&["# out 2"]), Limits::ALL);
        let limits = Limits {
            max_qos: QoS::AtMostOnce,
            retain: false,
            ..Limits::ALL
        };
        relay.remote_up(limits, &HashSet::new());
        let mut p = publish("a", QoS::ExactlyOnce, 4);
        p.message.retain = true;
        relay.local_message(p);
        let (local, remote) = drain(&mut relay);
        // Sent at QoS 0, so done at once.
        assert_eq!(local, vec![Command::Ack(pid(4))]);
        let Command::Publish(m) = &remote[0] else {
            unreachable!()
        };
        assert_eq!((m.qos, m.retain), (QoS::AtMostOnce, false));
    }

    #[test]
    fn incoming_messages_are_acknowledged_remotely_once_the_local_broker_has_them() {
        let mut relay = Relay::new(rules(&["cmd/# in 1 dev/ cloud/"]), Limits::ALL);
        up(&mut relay);
        relay.remote_message(publish("cloud/cmd/x", QoS::ExactlyOnce, 9));
        let (local, remote) = drain(&mut relay);
        assert!(remote.is_empty());
        assert_eq!(
            published(&local),
            vec![("dev/cmd/x".to_owned(), QoS::AtLeastOnce)]
        );
        let Command::Publish(m) = &local[0] else {
            unreachable!()
        };
        relay.local_delivered(m, ReasonCode::Success);
        assert_eq!(drain(&mut relay), (vec![], vec![Command::Ack(pid(9))]));
        assert_eq!(relay.take_counts().in_, 1);
    }

    #[test]
    fn an_acknowledgement_is_owed_only_to_the_connection_the_message_came_on() {
        let mut relay = Relay::new(rules(&["# in 1"]), Limits::ALL);
        up(&mut relay);
        relay.remote_message(publish("a", QoS::AtLeastOnce, 1));
        let (local, _) = drain(&mut relay);
        let Command::Publish(m) = &local[0] else {
            unreachable!()
        };
        relay.remote_down();
        up(&mut relay);
        relay.local_delivered(m, ReasonCode::Success);
        // The new connection's identifier 1 is another message: the remote broker sends this
        // one again.
        assert_eq!(drain(&mut relay), (vec![], vec![]));
    }

    #[test]
    fn messages_no_rule_maps_are_acknowledged_and_dropped() {
        let mut relay = Relay::new(rules(&["a/# out 1", "b/# in 1"]), Limits::ALL);
        up(&mut relay);
        relay.local_message(publish("b/1", QoS::AtLeastOnce, 1));
        relay.remote_message(publish("a/1", QoS::AtLeastOnce, 2));
        assert_eq!(
            drain(&mut relay),
            (vec![Command::Ack(pid(1))], vec![Command::Ack(pid(2))])
        );
        assert_eq!(relay.take_counts().dropped, 2);
    }

    #[test]
    fn the_first_matching_rule_maps() {
        let mut relay = Relay::new(
            rules(&["a/b out 0 \"\" first/", "a/# out 1 \"\" second/"]),
            Limits::ALL,
        );
        up(&mut relay);
        relay.local_message(publish("a/b", QoS::AtLeastOnce, 1));
        relay.local_message(publish("a/c", QoS::AtLeastOnce, 2));
        let (local, remote) = drain(&mut relay);
        assert_eq!(
            published(&remote),
            vec![
                ("first/a/b".to_owned(), QoS::AtMostOnce),
                ("second/a/c".to_owned(), QoS::AtLeastOnce)
            ]
        );
        assert_eq!(local, vec![Command::Ack(pid(1))]);
    }

    #[test]
    fn carried_follows_what_the_client_resends() {
        use mqttd_proto::session::QueueLimits;
        use mqttd_proto::{ClientId, Delivery};
        let mut session = Session::new(ClientId::default(), 60, QueueLimits::default());
        let message = |t: &str| {
            Arc::new(Message::new(
                TopicName::try_from(t).unwrap(),
                &b""[..],
                QoS::ExactlyOnce,
                false,
            ))
        };
        let (sent, released) = (message("s"), message("r"));
        session.restore_in_flight(
            pid(1),
            Delivery::new(sent.clone()),
            OutboundState::PublishSent,
        );
        session.restore_in_flight(
            pid(2),
            Delivery::new(released.clone()),
            OutboundState::ReleaseSent,
        );
        assert_eq!(
            carried(&session, true),
            HashSet::from([key(&sent), key(&released)])
        );
        assert_eq!(carried(&session, false), HashSet::from([key(&sent)]));
    }
}
