//! What a persistent session holds in the cluster state (sans-IO): its subscriptions, its will,
//! the messages queued for it, those in flight to its client under a packet id, and the QoS 2
//! packet ids its client published and has not released yet.
//!
//! It is replicated so that a session outlives its node: after a `kill -9` of the owner, the
//! node that claims the session (epoch + 1) reads all of it from its own copy of the state,
//! answers CONNACK with session present = 1 and sends what was in flight again with DUP and
//! the same packet ids.
//!
//! Two kinds of change:
//! - [`Command::Enqueue`](crate::Command::Enqueue), from any node (the one the publisher is
//!   connected to): one message for several sessions, with no epoch, since a publisher does not
//!   own the sessions it publishes to. The node acknowledges the publication (PUBACK, PUBREC)
//!   only once this is committed: persist, then acknowledge, cluster-wide.
//! - [`Command::SessionProgress`](crate::Command::SessionProgress), from the owner only,
//!   fenced by its epoch: a batch of [`Step`]s (a message sent under a packet id, acknowledged,
//!   released; a subscription made or removed; the will set).
//!
//! Steps are idempotent: a step that finds nothing to do (an acknowledgement for a packet id
//! no longer in flight, a queued message already sent) changes nothing and is counted in the
//! outcome, so a batch proposed again after an ambiguous failure does no harm.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

/// A message as the cluster stores it: what a subscriber must receive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// The topic name.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// The QoS it was published with.
    pub qos: u8,
    /// The RETAIN flag as published.
    pub retain: bool,
    /// MQTT 5 properties that travel with the message, as published.
    #[serde(default, skip_serializing_if = "StoredProperties::is_empty")]
    pub properties: StoredProperties,
}

/// The MQTT 5 properties a message carries to its subscribers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredProperties {
    /// Payload format indicator (1: UTF-8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_format: Option<u8>,
    /// When the message expires, in milliseconds since the Unix epoch (the publisher's
    /// interval turned into a time by the node it arrived at).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// Content type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Response topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    /// Correlation data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_data: Option<Vec<u8>>,
    /// User properties, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_properties: Vec<(String, String)>,
}

impl StoredProperties {
    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A subscription's options (MQTT 5 section 3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionOptions {
    /// The maximum QoS granted.
    pub qos: u8,
    /// No local: not sent the client's own publications.
    #[serde(default)]
    pub no_local: bool,
    /// Retain as published.
    #[serde(default)]
    pub retain_as_published: bool,
    /// The subscription identifier, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<u32>,
}

/// A session's will.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredWill {
    /// The message.
    pub message: StoredMessage,
    /// Seconds after the connection ends before it is published (MQTT 5 will delay).
    pub delay_secs: u32,
}

/// A message's identity in the cluster, chosen by the node that proposes it: the node, its
/// incarnation and a counter of that life. A session holds a message once, however often its
/// `Enqueue` was proposed (a proposal retried after an ambiguous failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageId {
    /// The proposing node.
    pub node: u64,
    /// Its incarnation.
    pub incarnation: u64,
    /// Counted by the node in that incarnation.
    pub counter: u64,
}

/// A message waiting to be sent to the session's client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    /// Its place in the session's queue: numbers grow, and are never reused by the session.
    pub seq: u64,
    /// Its identity.
    pub id: MessageId,
    /// The QoS it is to be delivered at (the lower of the publication's and the
    /// subscription's).
    pub qos: u8,
    /// The message.
    pub message: StoredMessage,
    /// The RETAIN flag to deliver it with, and the matching subscriptions' identifiers.
    #[serde(default, skip_serializing_if = "Delivered::is_plain")]
    pub delivered: Delivered,
}

/// How a queued message is to be delivered, beyond its QoS: what the matching subscriptions'
/// options made of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    /// The RETAIN flag (set only through a subscription with retain as published).
    #[serde(default)]
    pub retain: bool,
    /// The identifiers of the matching subscriptions (MQTT 5).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscription_ids: Vec<u32>,
}

impl Delivered {
    /// Neither flag nor identifiers.
    pub fn is_plain(&self) -> bool {
        !self.retain && self.subscription_ids.is_empty()
    }
}

/// A message sent to the client and not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// The queue number it had.
    pub seq: u64,
    /// Its identity.
    pub id: MessageId,
    /// QoS 1 or 2.
    pub qos: u8,
    /// The message.
    pub message: StoredMessage,
    /// QoS 2: PUBREC came and PUBREL was sent; what is sent again is PUBREL, not the message.
    pub released: bool,
    /// The RETAIN flag and subscription identifiers it was sent with.
    #[serde(default, skip_serializing_if = "Delivered::is_plain")]
    pub delivered: Delivered,
}

/// The contents of a persistent session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionData {
    /// Subscriptions by topic filter.
    pub subscriptions: BTreeMap<String, SubscriptionOptions>,
    /// Messages waiting to be sent, oldest first.
    pub queue: VecDeque<Queued>,
    /// Messages in flight by packet id.
    pub in_flight: BTreeMap<u16, InFlight>,
    /// QoS 2 packet ids the client published, acknowledged with PUBREC and not yet released:
    /// the same packet id sent again is not routed again.
    pub inbound_qos2: BTreeSet<u16>,
    /// The will, if the client set one.
    pub will: Option<StoredWill>,
    /// The identities of the messages queued or in flight, with their queue numbers.
    #[serde(with = "pairs")]
    pub held: BTreeMap<MessageId, u64>,
    /// The next queue number.
    pub next_seq: u64,
    /// Messages this session lost to a full queue (the policy: the newest is refused).
    pub dropped: u64,
}

/// One change the owner makes to its session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Step {
    /// The queued message `seq` was sent: under `packet_id` (QoS 1 and 2, now in flight), or
    /// at QoS 0 (`packet_id: None`: gone).
    Sent {
        /// Its queue number.
        seq: u64,
        /// The packet id it was sent under.
        packet_id: Option<u16>,
    },
    /// PUBACK (QoS 1) or PUBCOMP (QoS 2): the message is delivered and gone.
    Acked {
        /// Its packet id.
        packet_id: u16,
    },
    /// PUBREC for a QoS 2 message: PUBREL is what is owed now.
    Received {
        /// Its packet id.
        packet_id: u16,
    },
    /// The client's QoS 2 publication was stored and answered with PUBREC.
    InboundReceived {
        /// Its packet id.
        packet_id: u16,
    },
    /// The client released its QoS 2 publication (PUBREL).
    InboundReleased {
        /// Its packet id.
        packet_id: u16,
    },
    /// A subscription made or replaced.
    Subscribe {
        /// The topic filter.
        filter: String,
        /// Its options.
        options: SubscriptionOptions,
    },
    /// A subscription removed.
    Unsubscribe {
        /// The topic filter.
        filter: String,
    },
    /// The will set (at CONNECT) or cleared (published, or a normal DISCONNECT).
    Will(Option<StoredWill>),
    /// The session's subscriptions are now these (all of them).
    Subscriptions(BTreeMap<String, SubscriptionOptions>),
    /// The message with this identity was sent under `packet_id` (it is in flight now).
    SentId {
        /// The message.
        id: MessageId,
        /// Its packet id.
        packet_id: u16,
    },
    /// The message with this identity is done with: delivered, or dropped (expired).
    Forget {
        /// The message.
        id: MessageId,
    },
    /// Every message and QoS 2 state of the session is gone (it starts afresh).
    Clear,
}

/// What enqueueing a message for one session did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnqueueResult {
    /// Queued under this number.
    Queued(u64),
    /// Held already (queued or in flight) under this number: a repeated proposal.
    Held(u64),
    /// The session's queue was full: refused (and counted in [`SessionData::dropped`]).
    Full,
    /// There is no such session (it expired, or was dropped).
    NoSession,
}

impl SessionData {
    /// The messages in flight, by packet id, in the order they were queued (and so first
    /// sent): the order a new connection sends them again in (MQTT keeps a topic's order).
    /// Packet ids are not in that order: they wrap around, and each connection the session
    /// moves to numbers what it sends from its own next free id.
    pub fn in_flight_in_order(&self) -> Vec<(u16, &InFlight)> {
        let mut in_flight: Vec<(u16, &InFlight)> =
            self.in_flight.iter().map(|(id, f)| (*id, f)).collect();
        in_flight.sort_by_key(|(_, f)| f.seq);
        in_flight
    }

    /// Queues `message` at `qos`, unless it is held already or `max_queued` messages wait.
    pub(crate) fn enqueue(
        &mut self,
        id: MessageId,
        message: StoredMessage,
        qos: u8,
        max_queued: u32,
    ) -> EnqueueResult {
        self.enqueue_as(id, message, qos, Delivered::default(), max_queued)
    }

    /// As [`SessionData::enqueue`], to be delivered as `delivered` says.
    pub(crate) fn enqueue_as(
        &mut self,
        id: MessageId,
        message: StoredMessage,
        qos: u8,
        delivered: Delivered,
        max_queued: u32,
    ) -> EnqueueResult {
        if let Some(seq) = self.held.get(&id) {
            return EnqueueResult::Held(*seq);
        }
        if self.queue.len() >= max_queued as usize {
            self.dropped = self.dropped.saturating_add(1);
            return EnqueueResult::Full;
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        self.held.insert(id, seq);
        self.queue.push_back(Queued {
            seq,
            id,
            qos,
            message,
            delivered,
        });
        EnqueueResult::Queued(seq)
    }

    /// Applies one step; false if it found nothing to do.
    pub(crate) fn step(&mut self, step: Step) -> bool {
        match step {
            Step::Sent { seq, packet_id } => {
                let Some(at) = self.queue.iter().position(|q| q.seq == seq) else {
                    return false;
                };
                match packet_id {
                    // A packet id in use by another message: the sender is confused; refuse
                    // rather than lose the message in flight under it.
                    Some(id) if self.in_flight.contains_key(&id) => false,
                    Some(id) => {
                        let Some(q) = self.queue.remove(at) else {
                            return false;
                        };
                        self.in_flight.insert(
                            id,
                            InFlight {
                                seq: q.seq,
                                id: q.id,
                                qos: q.qos,
                                message: q.message,
                                released: false,
                                delivered: q.delivered,
                            },
                        );
                        true
                    }
                    None => match self.queue.remove(at) {
                        Some(q) => {
                            self.held.remove(&q.id);
                            true
                        }
                        None => false,
                    },
                }
            }
            Step::Acked { packet_id } => match self.in_flight.remove(&packet_id) {
                Some(f) => {
                    self.held.remove(&f.id);
                    true
                }
                None => false,
            },
            Step::Received { packet_id } => match self.in_flight.get_mut(&packet_id) {
                Some(f) if f.qos == 2 && !f.released => {
                    f.released = true;
                    true
                }
                _ => false,
            },
            Step::InboundReceived { packet_id } => self.inbound_qos2.insert(packet_id),
            Step::InboundReleased { packet_id } => self.inbound_qos2.remove(&packet_id),
            Step::Subscribe { filter, options } => {
                self.subscriptions.insert(filter, options) != Some(options)
            }
            Step::Unsubscribe { filter } => self.subscriptions.remove(&filter).is_some(),
            Step::Will(will) => {
                let changed = self.will != will;
                self.will = will;
                changed
            }
            Step::Subscriptions(subscriptions) => {
                let changed = self.subscriptions != subscriptions;
                self.subscriptions = subscriptions;
                changed
            }
            Step::SentId { id, packet_id } => match self.held.get(&id) {
                Some(&seq) => self.step(Step::Sent {
                    seq,
                    packet_id: Some(packet_id),
                }),
                None => false,
            },
            Step::Forget { id } => {
                let Some(seq) = self.held.remove(&id) else {
                    return false;
                };
                self.queue.retain(|q| q.seq != seq);
                self.in_flight.retain(|_, f| f.seq != seq);
                true
            }
            Step::Clear => {
                let changed = !(self.queue.is_empty()
                    && self.in_flight.is_empty()
                    && self.inbound_qos2.is_empty());
                self.queue.clear();
                self.in_flight.clear();
                self.inbound_qos2.clear();
                self.held.clear();
                changed
            }
        }
    }
}

/// A map whose keys are not strings, as a list of pairs (JSON objects take string keys only).
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<K, V, S>(map: &BTreeMap<K, V>, s: S) -> Result<S::Ok, S::Error>
    where
        K: Serialize,
        V: Serialize,
        S: Serializer,
    {
        s.collect_seq(map.iter())
    }

    pub(super) fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(counter: u64) -> MessageId {
        MessageId {
            node: 1,
            incarnation: 1,
            counter,
        }
    }

    fn msg(topic: &str) -> StoredMessage {
        StoredMessage {
            topic: topic.into(),
            payload: b"x".to_vec(),
            qos: 2,
            retain: false,
            properties: StoredProperties::default(),
        }
    }

    #[test]
    fn a_message_goes_from_the_queue_to_flight_to_gone() {
        let mut s = SessionData::default();
        assert_eq!(s.enqueue(id(1), msg("a"), 1, 10), EnqueueResult::Queued(0));
        assert_eq!(s.enqueue(id(2), msg("b"), 2, 10), EnqueueResult::Queued(1));
        assert_eq!(s.enqueue(id(1), msg("a"), 1, 10), EnqueueResult::Held(0));
        assert!(s.step(Step::Sent {
            seq: 0,
            packet_id: Some(7)
        }));
        assert!(!s.step(Step::Sent {
            seq: 0,
            packet_id: Some(8)
        }));
        assert!(
            !s.step(Step::Sent {
                seq: 1,
                packet_id: Some(7)
            }),
            "packet id 7 is taken"
        );
        assert!(s.step(Step::Sent {
            seq: 1,
            packet_id: Some(8)
        }));
        assert!(s.queue.is_empty());
        assert_eq!(
            s.enqueue(id(1), msg("a"), 1, 10),
            EnqueueResult::Held(0),
            "in flight, still held"
        );
        assert!(s.step(Step::Acked { packet_id: 7 }));
        assert!(!s.step(Step::Acked { packet_id: 7 }), "idempotent");
        assert!(!s.step(Step::Received { packet_id: 7 }));
        assert!(s.step(Step::Received { packet_id: 8 }));
        assert!(!s.step(Step::Received { packet_id: 8 }));
        assert!(s.in_flight.get(&8).is_some_and(|f| f.released));
        assert!(s.step(Step::Acked { packet_id: 8 }));
        assert!(s.in_flight.is_empty());
        assert!(s.held.is_empty());
    }

    /// Sent under packet id 134, then (on the connection the session moved to) under 2: sent
    /// again in that order, not by packet id.
    #[test]
    fn in_flight_messages_come_back_in_the_order_they_were_sent() {
        let mut s = SessionData::default();
        for (n, payload) in ["a", "b", "c"].into_iter().enumerate() {
            assert_eq!(
                s.enqueue(id(n as u64), msg(payload), 2, 10),
                EnqueueResult::Queued(n as u64)
            );
        }
        for (seq, packet_id) in [(0, 134), (1, 2), (2, 60)] {
            assert!(s.step(Step::Sent {
                seq,
                packet_id: Some(packet_id)
            }));
        }
        let order: Vec<(u16, u64)> = s
            .in_flight_in_order()
            .into_iter()
            .map(|(packet_id, f)| (packet_id, f.seq))
            .collect();
        assert_eq!(order, [(134, 0), (2, 1), (60, 2)]);
    }

    #[test]
    fn a_full_queue_refuses_the_newest_and_counts_it() {
        let mut s = SessionData::default();
        assert_eq!(s.enqueue(id(1), msg("a"), 1, 1), EnqueueResult::Queued(0));
        assert_eq!(s.enqueue(id(2), msg("b"), 1, 1), EnqueueResult::Full);
        assert_eq!(s.dropped, 1);
        assert!(s.step(Step::Sent {
            seq: 0,
            packet_id: None
        }));
        assert_eq!(s.enqueue(id(3), msg("c"), 1, 1), EnqueueResult::Queued(1));
    }

    #[test]
    fn subscriptions_will_and_inbound_qos2() {
        let mut s = SessionData::default();
        let o = SubscriptionOptions {
            qos: 1,
            no_local: false,
            retain_as_published: false,
            identifier: None,
        };
        assert!(s.step(Step::Subscribe {
            filter: "a/#".into(),
            options: o
        }));
        assert!(!s.step(Step::Subscribe {
            filter: "a/#".into(),
            options: o
        }));
        assert!(s.step(Step::Unsubscribe {
            filter: "a/#".into()
        }));
        assert!(s.step(Step::InboundReceived { packet_id: 3 }));
        assert!(!s.step(Step::InboundReceived { packet_id: 3 }));
        assert!(s.step(Step::InboundReleased { packet_id: 3 }));
        let will = StoredWill {
            message: msg("w"),
            delay_secs: 5,
        };
        assert!(s.step(Step::Will(Some(will.clone()))));
        assert_eq!(s.will, Some(will));
        assert!(s.step(Step::Will(None)));
    }
}
