//! What the peer of a state machine knows, tracked from the packets on the wire only, and the
//! checks both roles share.
//!
//! The model never looks inside the machine under test: it learns from what the machine
//! transmits and from what the harness fed it. Where it cannot know exactly when the machine
//! acted (acknowledgements a client pipelined before CONNACK, replayed inside `accept`), it
//! assumes the earliest moment, so what it believes in flight is never more than what really
//! is: every failed check is a real violation.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::BytesMut;
use mqttd_proto::codec::PacketReader;
use mqttd_proto::{
    ConnAckProperties, Disconnect, Packet, PacketId, ProtocolVersion, PubResponse, Publish, QoS,
    ReasonCode, SubscriptionOptions, TopicName,
};

/// Encodes a transmitted packet for `version` and asserts that it has the announced length and
/// decodes back to the same packet, less what `version` cannot carry.
pub fn assert_roundtrip(packet: &Packet, version: ProtocolVersion) {
    let read_as = match packet {
        Packet::Connect(_) => None,
        _ => Some(version),
    };
    let mut buf = BytesMut::new();
    if let Err(e) = packet.encode(version, &mut buf) {
        panic!("transmitted {packet:?} does not encode for MQTT {version}: {e}");
    }
    assert_eq!(
        buf.len(),
        packet.encoded_len(version),
        "encoded_len of transmitted {packet:?}"
    );
    let wire = buf.clone();
    let decoded = match PacketReader::new(u32::MAX).read(&mut buf, read_as) {
        Ok(Some(decoded)) => decoded,
        other => panic!("transmitted {packet:?} encodes as {wire:02X?}, which reads as {other:?}"),
    };
    assert!(buf.is_empty(), "trailing bytes after {packet:?}");
    assert_eq!(
        decoded,
        project(packet, version),
        "transmitted packet is not what a MQTT {version} peer reads"
    );
}

/// `packet` less the fields `version` has no room for, as the codec documents: properties,
/// most reason codes and the MQTT 5 subscription options before 5.0, and the session present
/// flag in 3.1.
fn project(packet: &Packet, version: ProtocolVersion) -> Packet {
    let mut p = packet.clone();
    if version.is_v5() {
        return p;
    }
    match &mut p {
        Packet::Connect(c) => {
            c.properties = Default::default();
            if let Some(will) = &mut c.will {
                will.properties = Default::default();
            }
        }
        Packet::ConnAck(c) => {
            c.session_present &= version != ProtocolVersion::V3_1;
            let code = c.reason.v3_connect_return_code();
            c.reason = ReasonCode::from_v3_connect_return_code(code).unwrap_or(c.reason);
            c.properties = ConnAckProperties::default();
        }
        Packet::Publish(p) => p.properties = Default::default(),
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            *r = PubResponse::success(r.packet_id);
        }
        Packet::Subscribe(s) => {
            s.properties = Default::default();
            for f in &mut s.filters {
                f.options = SubscriptionOptions {
                    qos: f.options.qos,
                    ..SubscriptionOptions::default()
                };
            }
        }
        Packet::SubAck(s) => {
            s.properties = Default::default();
            for r in &mut s.reasons {
                if r.is_error() {
                    *r = ReasonCode::UnspecifiedError;
                }
            }
        }
        Packet::Unsubscribe(u) => u.user_properties.clear(),
        Packet::UnsubAck(u) => {
            u.properties = Default::default();
            u.reasons.clear();
        }
        Packet::Disconnect(d) => *d = Disconnect::new(ReasonCode::Success),
        Packet::PingReq | Packet::PingResp | Packet::Auth(_) => {}
    }
    p
}

/// Which acknowledgement of an outgoing message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    PubAck,
    PubRec,
    PubComp,
}

/// An outgoing QoS 1 or 2 message as the peer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub qos: QoS,
    /// PUBREL seen.
    pub released: bool,
    /// Its PUBLISH was sent on this connection, so it counts against the receive maximum
    /// (false for a flow of the session not yet resent here).
    pub counted: bool,
}

/// The outgoing flows of one connection, and those its session carried over.
#[derive(Debug, Clone, Default)]
pub struct OutFlows {
    pub flows: BTreeMap<PacketId, Flow>,
    /// Identifiers of flows, most recently sent last, for `IdRef::Recent`.
    pub recent: Vec<PacketId>,
    /// Acknowledgements fed before CONNACK, which the server replays inside `accept`.
    pub early: Vec<(AckKind, PacketId, ReasonCode)>,
    /// Carried flows an early acknowledgement finished before their resend was seen.
    consumed: BTreeSet<PacketId>,
}

impl OutFlows {
    /// The flows a session carries to its next connection: none counted there yet.
    pub fn carried(&self) -> BTreeMap<PacketId, Flow> {
        self.flows
            .iter()
            .map(|(id, f)| {
                (
                    *id,
                    Flow {
                        counted: false,
                        ..*f
                    },
                )
            })
            .collect()
    }

    pub fn resume(carried: BTreeMap<PacketId, Flow>) -> Self {
        Self {
            recent: carried.keys().copied().collect(),
            flows: carried,
            ..Self::default()
        }
    }

    /// Whether a PUBLISH is the resend of a carried flow.
    pub fn is_resend(&self, p: &Publish) -> bool {
        p.dup
            && p.packet_id
                .is_some_and(|id| self.flows.get(&id).is_some_and(|f| !f.counted))
    }

    /// A PUBLISH was transmitted: no identifier reuse, and no more unacknowledged than
    /// `receive_maximum` [MQTT-2.2.1-3, MQTT-3.3.4-9].
    pub fn on_publish(&mut self, p: &Publish, receive_maximum: usize) {
        let Some(id) = p.packet_id else {
            return;
        };
        match self.flows.get_mut(&id) {
            Some(f) if !f.counted => {
                assert!(
                    p.dup,
                    "resent PUBLISH {id} without DUP [MQTT-3.3.1-1]: {p:?}"
                );
                assert!(
                    !f.released,
                    "PUBLISH {id} resent after its PUBREC; PUBREL was due [MQTT-4.4.0-1]"
                );
                assert_eq!(f.qos, p.qos, "PUBLISH {id} resent with another QoS");
                f.counted = true;
            }
            Some(f) => panic!(
                "PUBLISH {id} sent while {id} is still in flight ({f:?}) [MQTT-2.2.1-3]: {p:?}"
            ),
            // Resent, then finished by an acknowledgement the model already applied.
            None if p.dup && self.consumed.remove(&id) => return,
            None => {
                self.consumed.remove(&id);
                self.flows.insert(
                    id,
                    Flow {
                        qos: p.qos,
                        released: false,
                        counted: true,
                    },
                );
            }
        }
        crate::session::build::remember(&mut self.recent, id);
        let unacked = self.flows.values().filter(|f| f.counted).count();
        assert!(
            unacked <= receive_maximum,
            "{unacked} QoS 1 and 2 PUBLISH packets unacknowledged, the receiver allows \
             {receive_maximum} [MQTT-3.3.4-9]"
        );
    }

    /// A PUBREL was transmitted.
    pub fn on_pubrel(&mut self, id: PacketId) {
        if let Some(f) = self.flows.get_mut(&id) {
            assert_eq!(f.qos, QoS::ExactlyOnce, "PUBREL {id} for a QoS 1 message");
            f.released = true;
            crate::session::build::remember(&mut self.recent, id);
        }
    }

    /// The peer acknowledged `id`: the flow ends if the acknowledgement finishes it in its
    /// state. Returns whether it did.
    pub fn on_ack(&mut self, kind: AckKind, id: PacketId, reason: ReasonCode) -> bool {
        let Some(f) = self.flows.get(&id) else {
            return false;
        };
        let done = match kind {
            AckKind::PubAck => f.qos == QoS::AtLeastOnce,
            AckKind::PubRec => f.qos == QoS::ExactlyOnce && !f.released && reason.is_error(),
            AckKind::PubComp => f.qos == QoS::ExactlyOnce && f.released,
        };
        if done {
            if !f.counted {
                self.consumed.insert(id);
            }
            self.flows.remove(&id);
            self.recent.retain(|r| *r != id);
        }
        done
    }

    /// A carried flow was discarded instead of resent, because it no longer fits the peer's
    /// maximum packet size (reported as delivered with 0x95): its identifier is free.
    pub fn on_discarded(&mut self, id: PacketId) {
        if self.flows.get(&id).is_some_and(|f| !f.counted) {
            self.flows.remove(&id);
            self.recent.retain(|r| *r != id);
        }
    }

    /// Applies the early acknowledgements that finish a flow now; called after every transmit
    /// of the step in which `accept` replays them.
    pub fn apply_early(&mut self) {
        loop {
            let before = self.early.len();
            let mut early = std::mem::take(&mut self.early);
            early.retain(|(kind, id, reason)| !self.on_ack(*kind, *id, *reason));
            self.early = early;
            if self.early.len() == before {
                return;
            }
        }
    }

    /// The `accept` step is over: every early acknowledgement has been replayed.
    pub fn end_replay(&mut self) {
        self.apply_early();
        self.early.clear();
        self.consumed.clear();
    }
}

/// Topic aliases as the receiving peer records them.
#[derive(Debug, Clone, Default)]
pub struct Aliases {
    pub max: u16,
    pub v5: bool,
    topics: HashMap<u16, TopicName>,
}

impl Aliases {
    pub fn new(max: u16, v5: bool) -> Self {
        Self {
            max,
            v5,
            topics: HashMap::new(),
        }
    }

    /// Resolves a transmitted PUBLISH's topic as the receiver does (MQTT 5.0 section
    /// 3.3.2.3.4).
    pub fn resolve(&mut self, p: &Publish) -> TopicName {
        let Some(alias) = p.properties.topic_alias else {
            assert!(!p.topic.is_empty(), "PUBLISH without topic or alias: {p:?}");
            return p.topic.clone();
        };
        assert!(self.v5, "topic alias sent to an MQTT 3 peer: {p:?}");
        assert!(
            alias.get() <= self.max,
            "topic alias {alias} above the receiver's maximum {} [MQTT-3.3.2-9]",
            self.max
        );
        if p.topic.is_empty() {
            self.topics
                .get(&alias.get())
                .cloned()
                .unwrap_or_else(|| panic!("topic alias {alias} used before it was set: {p:?}"))
        } else {
            self.topics.insert(alias.get(), p.topic.clone());
            p.topic.clone()
        }
    }
}

/// Incoming QoS 1 and 2 messages as the receiving side's peer sees them.
#[derive(Debug, Clone, Default)]
pub struct Inbound {
    /// QoS 2 identifiers answered with a successful PUBREC and not yet released with
    /// PUBCOMP: session state, carried across connections.
    pub received: BTreeSet<PacketId>,
    /// Messages handed on (event) and not yet acknowledged by the application or broker, with
    /// their QoS, oldest first.
    pub awaiting: Vec<(PacketId, QoS)>,
}

impl Inbound {
    pub fn carried(&self) -> Self {
        Self {
            received: self.received.clone(),
            awaiting: Vec::new(),
        }
    }

    /// A message was handed on. `receive_maximum` is the limit the receiver announced; it
    /// must not have let more in [MQTT-3.3.4-8].
    pub fn on_handed_on(
        &mut self,
        id: Option<PacketId>,
        qos: QoS,
        receive_maximum: usize,
        track_awaiting: bool,
    ) {
        assert_eq!(
            id.is_some(),
            qos != QoS::AtMostOnce,
            "packet identifier does not match QoS {qos:?}"
        );
        let Some(id) = id else {
            return;
        };
        assert!(
            !self.awaiting.iter().any(|(a, _)| *a == id),
            "message {id} handed on again before the first was acknowledged"
        );
        if qos == QoS::ExactlyOnce {
            assert!(
                !self.received.contains(&id),
                "QoS 2 message {id} handed on again after PUBREC and before PUBREL \
                 [MQTT-4.3.3-9]"
            );
        }
        let unacked = self.awaiting.len() + self.received.len();
        assert!(
            unacked < receive_maximum,
            "message {id} handed on with {unacked} already unacknowledged, receive maximum \
             {receive_maximum} [MQTT-3.3.4-8]"
        );
        if track_awaiting {
            self.awaiting.push((id, qos));
        }
    }

    /// The receiving side transmitted `packet`.
    pub fn on_transmit(&mut self, packet: &Packet) {
        match packet {
            Packet::PubRec(r) if !r.reason.is_error() => {
                self.received.insert(r.packet_id);
            }
            Packet::PubComp(r) if !r.reason.is_error() => {
                self.received.remove(&r.packet_id);
            }
            _ => {}
        }
    }

    /// The application or broker acknowledged `id` after the connection closed: a QoS 2
    /// message is then recorded as received, unless `refused` (an MQTT 5 error code; MQTT 3
    /// has none).
    pub fn acked_after_close(&mut self, id: PacketId, refused: bool) {
        if let Some(pos) = self.awaiting.iter().position(|(a, _)| *a == id) {
            let (_, qos) = self.awaiting.remove(pos);
            if qos == QoS::ExactlyOnce && !refused {
                self.received.insert(id);
            }
        }
    }

    pub fn acked(&mut self, id: PacketId) {
        self.awaiting.retain(|(a, _)| *a != id);
    }

    pub fn awaiting_ids(&self) -> Vec<PacketId> {
        self.awaiting.iter().map(|(id, _)| *id).collect()
    }
}
