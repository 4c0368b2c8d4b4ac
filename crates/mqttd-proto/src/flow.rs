//! Message flows on an established connection, shared by both roles: QoS 1 and QoS 2 in both
//! directions, receive maximum both ways, maximum packet size, topic aliases both ways.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use crate::alias::{AliasError, AliasUse, InboundAliases, OutboundAliases};
use crate::message::{Delivery, Message};
use crate::packet::{AckProperties, Packet, PubResponse, Publish, MAX_REMAINING_LENGTH};
use crate::reason::ReasonCode;
use crate::session::{Enqueued, FlowError, OutboundState, Received, Session};
use crate::types::{PacketId, ProtocolVersion, QoS, TopicName};

/// A message received from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundPublish {
    /// The message, topic alias resolved and expiry converted to an instant.
    pub message: Message,
    /// For QoS 1 and 2: the identifier to acknowledge once the message is safe.
    pub packet_id: Option<PacketId>,
    /// DUP flag: the peer may have sent this message before.
    pub dup: bool,
    /// Identifiers of the subscriptions that matched (server to client only).
    pub subscription_ids: Vec<NonZeroU32>,
}

/// A rule the peer broke while exchanging messages; the connection must close with
/// [`Violation::reason_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// A topic alias was out of range or unknown.
    #[error(transparent)]
    TopicAlias(#[from] AliasError),
    /// More unacknowledged QoS 1 and 2 messages than our receive maximum [MQTT-3.3.4-7].
    #[error("more than {0} QoS 1 and 2 messages unacknowledged")]
    ReceiveMaximumExceeded(u16),
    /// A QoS above the maximum QoS we announced [MQTT-3.2.2-11].
    #[error("QoS {0:?} above the maximum announced")]
    QoSNotSupported(QoS),
    /// RETAIN set though we announced retain is not available [MQTT-3.2.2-14].
    #[error("retain not supported")]
    RetainNotSupported,
    /// A packet that is not allowed in the current state.
    #[error("{0}")]
    Protocol(&'static str),
    /// The peer's keep alive ran out.
    #[error("keep alive timeout")]
    KeepAliveTimeout,
    /// The peer closed the network connection.
    #[error("connection lost")]
    ConnectionLost,
}

impl Violation {
    /// The reason code for the DISCONNECT that answers the violation.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Self::TopicAlias(AliasError::OutOfRange { .. }) => ReasonCode::TopicAliasInvalid,
            Self::TopicAlias(_) | Self::Protocol(_) => ReasonCode::ProtocolError,
            Self::ReceiveMaximumExceeded(_) => ReasonCode::ReceiveMaximumExceeded,
            Self::QoSNotSupported(_) => ReasonCode::QoSNotSupported,
            Self::RetainNotSupported => ReasonCode::RetainNotSupported,
            Self::KeepAliveTimeout => ReasonCode::KeepAliveTimeout,
            Self::ConnectionLost => ReasonCode::UnspecifiedError,
        }
    }
}

/// Limits this side announced to the peer and now enforces on what it receives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalLimits {
    pub(crate) receive_maximum: u16,
    pub(crate) topic_alias_maximum: u16,
    pub(crate) maximum_qos: QoS,
    pub(crate) retain_available: bool,
}

/// Limits the peer announced, which this side obeys when sending.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerLimits {
    pub(crate) receive_maximum: u16,
    pub(crate) maximum_packet_size: u32,
    pub(crate) topic_alias_maximum: u16,
    /// The highest QoS the peer accepts [MQTT-3.2.2-11].
    pub(crate) maximum_qos: QoS,
    /// Whether the peer accepts RETAIN [MQTT-3.2.2-14].
    pub(crate) retain_available: bool,
}

/// Something the flows report to the role's state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FlowEvent {
    /// An outgoing QoS 1 or 2 message finished (PUBACK, PUBCOMP or a refusing PUBREC), or
    /// was discarded as too large for the peer when it was due for resending (0x95).
    Completed {
        packet_id: PacketId,
        reason: ReasonCode,
        delivery: Delivery,
    },
    /// A stored QoS 2 message went out under `packet_id`, which must be recorded with it
    /// before the PUBLISH leaves, so that a restarted broker resends it under the same one.
    Sent { packet_id: PacketId, store_seq: u64 },
    /// An outgoing QoS 2 message was received by the peer; PUBREL sent.
    Released {
        packet_id: PacketId,
        store_seq: Option<u64>,
    },
    /// An incoming QoS 2 message was released by PUBREL; PUBCOMP sent.
    InboundReleased { packet_id: PacketId },
}

/// The message flows of one established connection, with the session they belong to.
#[derive(Debug)]
pub(crate) struct Flows {
    pub(crate) version: ProtocolVersion,
    pub(crate) session: Session,
    local: LocalLimits,
    peer: PeerLimits,
    inbound_aliases: InboundAliases,
    outbound_aliases: OutboundAliases,
    /// Incoming QoS 1 and 2 messages handed on and not yet acknowledged by our side.
    awaiting_local_ack: HashMap<PacketId, QoS>,
    /// Flows of the session, in their original order, not yet resent on this connection
    /// because the peer's receive maximum did not allow it yet.
    unsent: VecDeque<PacketId>,
    pub(crate) events: VecDeque<FlowEvent>,
}

impl Flows {
    pub(crate) fn new(
        version: ProtocolVersion,
        session: Session,
        local: LocalLimits,
        peer: PeerLimits,
    ) -> Self {
        Self {
            version,
            session,
            inbound_aliases: InboundAliases::new(local.topic_alias_maximum),
            outbound_aliases: OutboundAliases::new(peer.topic_alias_maximum),
            local,
            peer,
            awaiting_local_ack: HashMap::new(),
            unsent: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Resends the flows the session had in flight, in their original order [MQTT-4.4.0-1],
    /// then sends from the queue. Both count against the peer's receive maximum of this
    /// connection [MQTT-3.3.4-9]: flows beyond it are resent as acknowledgements free the
    /// window, before anything new.
    pub(crate) fn resume(&mut self, now: Instant, out: &mut VecDeque<Packet>) {
        self.unsent = self.session.outbound.resume_order().into();
        self.pump(now, out);
    }

    fn resend(&mut self, now: Instant, id: PacketId, out: &mut VecDeque<Packet>) {
        let Some(entry) = self.session.outbound.get(id) else {
            return;
        };
        match entry.state {
            OutboundState::PublishSent => {
                let delivery = entry.delivery.clone();
                if self.fits(now, &delivery) {
                    let _ = self.send_publish(now, Some(id), &delivery, true, out);
                } else if let Ok(delivery) = self.session.outbound.remove(id) {
                    // This connection's peer takes smaller packets than the one the message
                    // was first sent to: discard it as if its flow were complete
                    // [MQTT-3.1.2-25].
                    self.session.drops.too_large += 1;
                    self.events.push_back(FlowEvent::Completed {
                        packet_id: id,
                        reason: ReasonCode::PacketTooLarge,
                        delivery,
                    });
                }
            }
            OutboundState::ReleaseSent => out.push_back(Packet::PubRel(PubResponse::success(id))),
        }
    }

    /// Whether the peer's receive maximum allows one more QoS 1 or 2 message on this
    /// connection; flows not yet resent on it do not count.
    fn window_open(&self) -> bool {
        let sent = self.session.outbound.in_flight_len() - self.unsent.len();
        sent < usize::from(self.peer.receive_maximum)
    }

    /// The peer answered flow `id`: it is no longer waiting to be resent.
    fn answered(&mut self, id: PacketId) {
        if !self.unsent.is_empty() {
            self.unsent.retain(|u| *u != id);
        }
    }

    /// Sends a message now if the window allows, else queues it.
    pub(crate) fn deliver(
        &mut self,
        now: Instant,
        delivery: Delivery,
        out: &mut VecDeque<Packet>,
    ) -> Enqueued {
        if delivery.message.is_expired(now) {
            self.session.drops.expired += 1;
            return Enqueued::Expired;
        }
        let delivery = self.within_peer_limits(delivery);
        if delivery.qos == QoS::AtMostOnce {
            return self.send_publish(now, None, &delivery, false, out);
        }
        if !self.session.outbound.queue_is_empty() || !self.unsent.is_empty() || !self.window_open()
        {
            return self.session.enqueue(now, delivery);
        }
        self.start(now, delivery, out)
    }

    /// A new message as the peer accepts it: messages queued before its limits were known (a
    /// client's publications before CONNACK, or from an earlier connection) go at most at its
    /// maximum QoS, and without RETAIN if it has no retained messages.
    fn within_peer_limits(&self, mut delivery: Delivery) -> Delivery {
        delivery.qos = delivery.qos.min(self.peer.maximum_qos);
        delivery.retain &= self.peer.retain_available;
        delivery
    }

    fn start(&mut self, now: Instant, delivery: Delivery, out: &mut VecDeque<Packet>) -> Enqueued {
        if !self.fits(now, &delivery) {
            self.session.drops.too_large += 1;
            return Enqueued::TooLarge;
        }
        match self.session.outbound.start(delivery.clone()) {
            Some(id) => {
                if let (QoS::ExactlyOnce, Some(store_seq)) = (delivery.qos, delivery.store_seq) {
                    self.events.push_back(FlowEvent::Sent {
                        packet_id: id,
                        store_seq,
                    });
                }
                self.send_publish(now, Some(id), &delivery, false, out)
            }
            None => self.session.enqueue(now, delivery),
        }
    }

    /// Moves flows awaiting their resend, then queued messages, into the window.
    pub(crate) fn pump(&mut self, now: Instant, out: &mut VecDeque<Packet>) {
        while self.window_open() {
            if let Some(id) = self.unsent.pop_front() {
                self.resend(now, id, out);
                continue;
            }
            let Some(delivery) = self
                .session
                .outbound
                .pop(now, &mut self.session.drops.expired)
            else {
                break;
            };
            let delivery = self.within_peer_limits(delivery);
            if delivery.qos == QoS::AtMostOnce {
                let _ = self.send_publish(now, None, &delivery, false, out);
            } else {
                let _ = self.start(now, delivery, out);
            }
        }
    }

    fn publish_packet(
        &self,
        now: Instant,
        packet_id: Option<PacketId>,
        delivery: &Delivery,
        dup: bool,
    ) -> Publish {
        let message: &Arc<Message> = &delivery.message;
        let properties = if self.version.is_v5() {
            message.publish_properties(now, &delivery.subscription_ids)
        } else {
            Default::default()
        };
        Publish {
            dup,
            qos: delivery.qos,
            retain: delivery.retain,
            topic: message.topic.clone(),
            packet_id,
            properties,
            payload: message.payload.clone(),
        }
    }

    /// Whether the message, sent now, fits the peer's maximum packet size [MQTT-3.1.2-24]:
    /// sized exactly as [`Self::send_publish`] will send it, packet identifier and topic alias
    /// included.
    fn fits(&self, now: Instant, delivery: &Delivery) -> bool {
        // No packet can be larger than the largest remaining length; skip the sizing then.
        if u64::from(self.peer.maximum_packet_size) > u64::from(MAX_REMAINING_LENGTH) + 4 {
            return true;
        }
        let packet_id = (delivery.qos != QoS::AtMostOnce).then_some(PacketId::MIN);
        let mut probe = self.publish_packet(now, packet_id, delivery, false);
        if self.version.is_v5() {
            let alias = self.outbound_aliases.peek(&probe.topic);
            apply_alias(&mut probe, alias);
        }
        Packet::Publish(probe).encoded_len(self.version) as u64
            <= u64::from(self.peer.maximum_packet_size)
    }

    fn send_publish(
        &mut self,
        now: Instant,
        packet_id: Option<PacketId>,
        delivery: &Delivery,
        dup: bool,
        out: &mut VecDeque<Packet>,
    ) -> Enqueued {
        let mut publish = self.publish_packet(now, packet_id, delivery, dup);
        if packet_id.is_none() && !self.fits(now, delivery) {
            self.session.drops.too_large += 1;
            return Enqueued::TooLarge;
        }
        if self.version.is_v5() {
            let alias = self.outbound_aliases.lookup(&publish.topic);
            apply_alias(&mut publish, alias);
        }
        out.push_back(Packet::Publish(publish));
        Enqueued::Sent
    }

    /// Handles PUBACK.
    pub(crate) fn on_puback(&mut self, now: Instant, ack: PubResponse, out: &mut VecDeque<Packet>) {
        if let Ok(delivery) = self.session.outbound.puback(ack.packet_id) {
            self.answered(ack.packet_id);
            self.events.push_back(FlowEvent::Completed {
                packet_id: ack.packet_id,
                reason: ack.reason,
                delivery,
            });
            self.pump(now, out);
        }
    }

    /// Handles PUBREC: PUBREL, or the end of a refused flow.
    pub(crate) fn on_pubrec(&mut self, now: Instant, rec: PubResponse, out: &mut VecDeque<Packet>) {
        let id = rec.packet_id;
        match self.session.outbound.pubrec(id, rec.reason.is_error()) {
            Ok(Received::Release) => {
                self.answered(id);
                let store_seq = self
                    .session
                    .outbound
                    .get(id)
                    .and_then(|f| f.delivery.store_seq);
                self.events.push_back(FlowEvent::Released {
                    packet_id: id,
                    store_seq,
                });
                out.push_back(Packet::PubRel(PubResponse::success(id)));
            }
            Ok(Received::Refused(delivery)) => {
                self.answered(id);
                self.events.push_back(FlowEvent::Completed {
                    packet_id: id,
                    reason: rec.reason,
                    delivery,
                });
                self.pump(now, out);
            }
            // A PUBREC for a flow we no longer know: answer so the peer can finish its side.
            Err(FlowError::UnknownPacketId(_)) if !rec.reason.is_error() => {
                out.push_back(Packet::PubRel(self.not_found(id)));
            }
            Err(_) => {}
        }
    }

    /// Handles PUBCOMP.
    pub(crate) fn on_pubcomp(
        &mut self,
        now: Instant,
        comp: PubResponse,
        out: &mut VecDeque<Packet>,
    ) {
        if let Ok(delivery) = self.session.outbound.pubcomp(comp.packet_id) {
            self.answered(comp.packet_id);
            self.events.push_back(FlowEvent::Completed {
                packet_id: comp.packet_id,
                reason: comp.reason,
                delivery,
            });
            self.pump(now, out);
        }
    }

    fn not_found(&self, id: PacketId) -> PubResponse {
        let reason = if self.version.is_v5() {
            ReasonCode::PacketIdentifierNotFound
        } else {
            ReasonCode::Success
        };
        PubResponse {
            packet_id: id,
            reason,
            properties: AckProperties::default(),
        }
    }

    /// Handles an incoming PUBLISH. Returns the message to hand on, or `None` for a duplicate
    /// that was already answered.
    pub(crate) fn on_publish(
        &mut self,
        now: Instant,
        mut publish: Publish,
        out: &mut VecDeque<Packet>,
    ) -> Result<Option<InboundPublish>, Violation> {
        if publish.qos > self.local.maximum_qos {
            return Err(Violation::QoSNotSupported(publish.qos));
        }
        if publish.retain && !self.local.retain_available {
            return Err(Violation::RetainNotSupported);
        }
        let alias = publish.properties.topic_alias.take();
        publish.topic = self.inbound_aliases.resolve(publish.topic, alias)?;
        let packet_id = publish.packet_id;
        if let Some(id) = packet_id {
            if self.awaiting_local_ack.contains_key(&id) {
                // A retransmission of a message we have not acknowledged yet: the answer is
                // already coming.
                return Ok(None);
            }
            if publish.qos == QoS::ExactlyOnce && self.session.inbound_qos2.contains(&id) {
                out.push_back(Packet::PubRec(PubResponse::success(id)));
                return Ok(None);
            }
            let unacked = self.awaiting_local_ack.len() + self.session.inbound_qos2.len();
            if unacked >= usize::from(self.local.receive_maximum) {
                return Err(Violation::ReceiveMaximumExceeded(
                    self.local.receive_maximum,
                ));
            }
            self.awaiting_local_ack.insert(id, publish.qos);
        }
        let dup = publish.dup;
        let subscription_ids = std::mem::take(&mut publish.properties.subscription_identifiers);
        Ok(Some(InboundPublish {
            message: Message::from_publish(publish, now),
            packet_id,
            dup,
            subscription_ids,
        }))
    }

    /// Incoming QoS 1 and 2 messages handed on and not yet acknowledged by our side, taken
    /// when the connection closes.
    pub(crate) fn take_unacked(&mut self) -> HashMap<PacketId, QoS> {
        std::mem::take(&mut self.awaiting_local_ack)
    }

    /// Acknowledges an incoming message once our side has made it safe: PUBACK for QoS 1,
    /// PUBREC for QoS 2. Returns false if no message awaits acknowledgement under `id`.
    pub(crate) fn ack_inbound(
        &mut self,
        id: PacketId,
        reason: ReasonCode,
        out: &mut VecDeque<Packet>,
    ) -> bool {
        let Some(qos) = self.awaiting_local_ack.remove(&id) else {
            return false;
        };
        let response = PubResponse {
            packet_id: id,
            reason,
            properties: AckProperties::default(),
        };
        if qos == QoS::ExactlyOnce {
            if !reason.is_error() {
                self.session.inbound_qos2.insert(id);
            }
            out.push_back(Packet::PubRec(response));
        } else {
            out.push_back(Packet::PubAck(response));
        }
        true
    }

    /// Handles PUBREL: always answered with PUBCOMP, "not found" if the identifier is unknown.
    pub(crate) fn on_pubrel(&mut self, rel: PubResponse, out: &mut VecDeque<Packet>) {
        let id = rel.packet_id;
        if self.session.inbound_qos2.remove(&id) {
            self.events
                .push_back(FlowEvent::InboundReleased { packet_id: id });
            out.push_back(Packet::PubComp(PubResponse::success(id)));
        } else {
            out.push_back(Packet::PubComp(self.not_found(id)));
        }
    }
}

/// Names a PUBLISH's topic as `alias` says.
fn apply_alias(publish: &mut Publish, alias: AliasUse) {
    match alias {
        AliasUse::None => {}
        AliasUse::Set(alias) => publish.properties.topic_alias = Some(alias),
        AliasUse::Use(alias) => {
            publish.properties.topic_alias = Some(alias);
            publish.topic = TopicName::empty();
        }
    }
}

/// Acknowledges, after its connection closed, a message that was handed on before it did:
/// nothing can be sent, but a QoS 2 message accepted with `reason` is recorded in the session
/// as received, so the peer's retransmission on its next connection is answered with PUBREC
/// and not handed on a second time [MQTT-4.3.3-9]. Returns false if nothing awaited an
/// acknowledgement under `id`.
pub(crate) fn ack_after_close(
    unacked: &mut HashMap<PacketId, QoS>,
    session: &mut Session,
    id: PacketId,
    reason: ReasonCode,
) -> bool {
    let Some(qos) = unacked.remove(&id) else {
        return false;
    };
    if qos == QoS::ExactlyOnce && !reason.is_error() {
        session.inbound_qos2.insert(id);
    }
    true
}
