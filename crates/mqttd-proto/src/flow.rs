//! Message flows on an established connection, shared by both roles: QoS 1 and QoS 2 in both
//! directions, receive maximum both ways, maximum packet size, topic aliases both ways, and the
//! stream each packet of a flow travels on.
//!
//! Stream rules (MQTT over QUIC, multi-stream): an acknowledgement goes on the stream of the
//! packet it answers; a PUBREL goes on the stream its PUBLISH went; topic aliases are per
//! stream; packet identifiers are per session, whatever the stream. When a data stream is lost,
//! what was owed on it moves to the control stream.

use std::collections::{HashSet, VecDeque};

use crate::sparse::{SparseMap, SparseSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use crate::alias::{AliasError, AliasUse, InboundAliases, OutboundAliases, PerStream};
use crate::message::{Delivery, Message};
use crate::packet::{AckProperties, Packet, PubResponse, Publish, MAX_REMAINING_LENGTH};
use crate::reason::ReasonCode;
use crate::session::{Enqueued, FlowError, IdleSession, OutboundState, Received, Session};
use crate::types::{PacketId, ProtocolVersion, QoS, StreamId, TopicName};

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
}

impl Violation {
    /// The reason code for the DISCONNECT that answers the violation.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Self::TopicAlias(AliasError::OutOfRange { .. }) => ReasonCode::TopicAliasInvalid,
            Self::TopicAlias(_) => ReasonCode::ProtocolError,
            Self::ReceiveMaximumExceeded(_) => ReasonCode::ReceiveMaximumExceeded,
            Self::QoSNotSupported(_) => ReasonCode::QoSNotSupported,
            Self::RetainNotSupported => ReasonCode::RetainNotSupported,
        }
    }
}

/// Packets to send, each with the stream it goes on.
pub(crate) type Transmits = VecDeque<(StreamId, Packet)>;

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
/// [`Flows`] with nothing going on, in their smallest form (see [`Flows::into_idle`]).
#[derive(Debug)]
pub(crate) struct IdleFlows {
    pub(crate) version: ProtocolVersion,
    session: IdleSession,
    local: LocalLimits,
    peer: PeerLimits,
}

impl IdleFlows {
    /// The flows again, as they were.
    pub(crate) fn into_flows(self) -> Flows {
        Flows::new(
            self.version,
            self.session.into_session(),
            self.local,
            self.peer,
        )
    }
}

#[derive(Debug)]
pub(crate) struct Flows {
    pub(crate) version: ProtocolVersion,
    pub(crate) session: Session,
    local: LocalLimits,
    peer: PeerLimits,
    /// The peer's topic aliases, per stream.
    inbound_aliases: PerStream<InboundAliases>,
    /// Our topic aliases, per stream.
    outbound_aliases: PerStream<OutboundAliases>,
    /// Incoming QoS 1 and 2 messages handed on and not yet acknowledged by our side, with the
    /// stream the acknowledgement goes on.
    awaiting_local_ack: SparseMap<PacketId, (QoS, StreamId)>,
    /// Data streams that carried a packet and were not lost since: the streams a message may
    /// be sent on besides the control stream.
    streams: SparseSet<StreamId>,
    /// The stream of each outgoing flow that is not on the control stream: its PUBREL (and a
    /// resend after the stream is lost) follows it.
    flow_streams: SparseMap<PacketId, StreamId>,
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
            inbound_aliases: PerStream::new(local.topic_alias_maximum, InboundAliases::new),
            outbound_aliases: PerStream::new(peer.topic_alias_maximum, OutboundAliases::new),
            local,
            peer,
            awaiting_local_ack: SparseMap::new(),
            streams: SparseSet::new(),
            flow_streams: SparseMap::new(),
            unsent: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Whether nothing is going on: no message in flight either way, none queued or waiting
    /// for the window, no topic alias set, no data stream known.
    pub(crate) fn is_idle(&self) -> bool {
        self.inbound_aliases.is_unused()
            && self.outbound_aliases.is_unused()
            && self.awaiting_local_ack.is_empty()
            && self.streams.is_empty()
            && self.flow_streams.is_empty()
            && self.unsent.is_empty()
            && self.events.is_empty()
            && self.session.is_idle()
    }

    /// The flows in their smallest form. Only for idle flows ([`Self::is_idle`]): the tables
    /// and queues are dropped, and with them whatever they held.
    pub(crate) fn into_idle(self) -> IdleFlows {
        debug_assert!(self.is_idle());
        // Named one by one, so that a field added later is not forgotten here.
        let Self {
            version,
            session,
            local,
            peer,
            inbound_aliases: _,
            outbound_aliases: _,
            awaiting_local_ack: _,
            streams: _,
            flow_streams: _,
            unsent: _,
            events: _,
        } = self;
        IdleFlows {
            version,
            session: session.into_idle(),
            local,
            peer,
        }
    }

    /// Resends the flows the session had in flight, in their original order [MQTT-4.4.0-1],
    /// then sends from the queue. Both count against the peer's receive maximum of this
    /// connection [MQTT-3.3.4-9]: flows beyond it are resent as acknowledgements free the
    /// window, before anything new.
    pub(crate) fn resume(&mut self, now: Instant, out: &mut Transmits) {
        self.unsent = self.session.outbound.resume_order().into();
        self.pump(now, out);
    }

    /// Gives back the memory of empty queues and tables (see `ServerConnection::compact`).
    pub(crate) fn compact(&mut self) {
        self.inbound_aliases.release_if_empty();
        self.outbound_aliases.release_if_empty();
        self.awaiting_local_ack.release_if_empty();
        self.streams.release_if_empty();
        self.flow_streams.release_if_empty();
        release_if_empty(&mut self.unsent);
        release_if_empty(&mut self.events);
        self.session.outbound.release_if_empty();
    }

    /// Records that a packet arrived on `stream`: messages may be sent on it from now on.
    pub(crate) fn note_stream(&mut self, stream: StreamId) {
        if !stream.is_control() {
            self.streams.insert(stream);
        }
    }

    /// The stream a message for `stream` goes on: the control stream if `stream` is not one
    /// this connection knows, or was lost.
    pub(crate) fn live(&self, stream: StreamId) -> StreamId {
        if stream.is_control() || self.streams.contains(&stream) {
            stream
        } else {
            StreamId::CONTROL
        }
    }

    /// The stream the packets of outgoing flow `id` go on.
    fn flow_stream(&self, id: PacketId) -> StreamId {
        self.flow_streams
            .get(&id)
            .copied()
            .unwrap_or(StreamId::CONTROL)
    }

    /// Outgoing flow `id` is over.
    fn forget_flow(&mut self, id: PacketId) {
        if !self.flow_streams.is_empty() {
            self.flow_streams.remove(&id);
        }
    }

    /// A data stream ended: what was owed on it moves to the control stream. Acknowledgements
    /// not yet sent go on the control stream; outgoing flows sent on the stream continue there,
    /// resent (PUBLISH with DUP, or PUBREL) since the peer may never have read them; queued
    /// messages for the stream go on the control stream; its topic aliases are forgotten.
    /// QoS 0 messages not yet sent on it are dropped (at most once).
    pub(crate) fn stream_lost(&mut self, now: Instant, stream: StreamId, out: &mut Transmits) {
        if stream.is_control() {
            return;
        }
        self.streams.remove(&stream);
        self.inbound_aliases.remove(stream);
        self.outbound_aliases.remove(stream);
        for (_, ack_stream) in self.awaiting_local_ack.values_mut() {
            if *ack_stream == stream {
                *ack_stream = StreamId::CONTROL;
            }
        }
        self.session.outbound.move_queued(stream, StreamId::CONTROL);
        let moved: HashSet<PacketId> = self
            .flow_streams
            .iter()
            .filter(|(_, s)| **s == stream)
            .map(|(id, _)| *id)
            .collect();
        self.flow_streams.retain(|_, s| *s != stream);
        // Packets not yet taken by the driver: answers move to the control stream; PUBLISH
        // and PUBREL of a flow are resent below (their topic aliases were the lost stream's).
        out.retain_mut(|(s, packet)| {
            if *s != stream {
                return true;
            }
            match packet {
                Packet::Publish(_) => false,
                Packet::PubRel(rel) if moved.contains(&rel.packet_id) => false,
                _ => {
                    *s = StreamId::CONTROL;
                    true
                }
            }
        });
        if moved.is_empty() {
            return;
        }
        for id in self.session.outbound.resume_order() {
            if moved.contains(&id) {
                self.resend(now, id, out);
            }
        }
    }

    fn resend(&mut self, now: Instant, id: PacketId, out: &mut Transmits) {
        let Some(entry) = self.session.outbound.get(id) else {
            return;
        };
        let stream = self.flow_stream(id);
        match entry.state {
            OutboundState::PublishSent => {
                let delivery = entry.delivery.clone();
                if self.fits(now, stream, &delivery) {
                    let _ = self.send_publish(now, stream, Some(id), &delivery, true, out);
                } else if let Ok(delivery) = self.session.outbound.remove(id) {
                    self.forget_flow(id);
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
            OutboundState::ReleaseSent => {
                out.push_back((stream, Packet::PubRel(PubResponse::success(id))));
            }
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

    /// Sends a message on `stream` (the control stream if that one is unknown or lost) now if
    /// the window allows, else queues it.
    pub(crate) fn deliver(
        &mut self,
        now: Instant,
        stream: StreamId,
        delivery: Delivery,
        out: &mut Transmits,
    ) -> Enqueued {
        if delivery.message.is_expired(now) {
            self.session.drops.expired += 1;
            return Enqueued::Expired;
        }
        let stream = self.live(stream);
        let delivery = self.within_peer_limits(delivery);
        if delivery.qos == QoS::AtMostOnce {
            return self.send_publish(now, stream, None, &delivery, false, out);
        }
        if !self.session.outbound.queue_is_empty() || !self.unsent.is_empty() || !self.window_open()
        {
            return self.session.enqueue_on(now, stream, delivery);
        }
        self.start(now, stream, delivery, out)
    }

    /// A new message as the peer accepts it: messages queued before its limits were known (a
    /// client's publications before CONNACK, or from an earlier connection) go at most at its
    /// maximum QoS, and without RETAIN if it has no retained messages.
    fn within_peer_limits(&self, mut delivery: Delivery) -> Delivery {
        delivery.qos = delivery.qos.min(self.peer.maximum_qos);
        delivery.retain &= self.peer.retain_available;
        delivery
    }

    fn start(
        &mut self,
        now: Instant,
        stream: StreamId,
        delivery: Delivery,
        out: &mut Transmits,
    ) -> Enqueued {
        if !self.fits(now, stream, &delivery) {
            self.session.drops.too_large += 1;
            return Enqueued::TooLarge;
        }
        match self.session.outbound.start(delivery.clone()) {
            Some(id) => {
                if stream.is_control() {
                    self.forget_flow(id);
                } else {
                    self.flow_streams.insert(id, stream);
                }
                if let (QoS::ExactlyOnce, Some(store_seq)) = (delivery.qos, delivery.store_seq) {
                    self.events.push_back(FlowEvent::Sent {
                        packet_id: id,
                        store_seq,
                    });
                }
                self.send_publish(now, stream, Some(id), &delivery, false, out)
            }
            None => self.session.enqueue_on(now, stream, delivery),
        }
    }

    /// Moves flows awaiting their resend, then queued messages, into the window.
    pub(crate) fn pump(&mut self, now: Instant, out: &mut Transmits) {
        while self.window_open() {
            if let Some(id) = self.unsent.pop_front() {
                self.resend(now, id, out);
                continue;
            }
            let Some((delivery, stream)) = self
                .session
                .outbound
                .pop(now, &mut self.session.drops.expired)
            else {
                break;
            };
            let stream = self.live(stream);
            let delivery = self.within_peer_limits(delivery);
            if delivery.qos == QoS::AtMostOnce {
                let _ = self.send_publish(now, stream, None, &delivery, false, out);
            } else {
                let _ = self.start(now, stream, delivery, out);
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

    /// Whether the message, sent now on `stream`, fits the peer's maximum packet size
    /// [MQTT-3.1.2-24]: sized exactly as [`Self::send_publish`] will send it, packet identifier
    /// and topic alias included.
    fn fits(&self, now: Instant, stream: StreamId, delivery: &Delivery) -> bool {
        // No packet can be larger than the largest remaining length; skip the sizing then.
        if u64::from(self.peer.maximum_packet_size) > u64::from(MAX_REMAINING_LENGTH) + 4 {
            return true;
        }
        let packet_id = (delivery.qos != QoS::AtMostOnce).then_some(PacketId::MIN);
        let mut probe = self.publish_packet(now, packet_id, delivery, false);
        if self.version.is_v5() {
            let alias = match self.outbound_aliases.get(stream) {
                Some(aliases) => aliases.peek(&probe.topic),
                None => OutboundAliases::new(self.peer.topic_alias_maximum).peek(&probe.topic),
            };
            apply_alias(&mut probe, alias);
        }
        Packet::Publish(probe).encoded_len(self.version) as u64
            <= u64::from(self.peer.maximum_packet_size)
    }

    fn send_publish(
        &mut self,
        now: Instant,
        stream: StreamId,
        packet_id: Option<PacketId>,
        delivery: &Delivery,
        dup: bool,
        out: &mut Transmits,
    ) -> Enqueued {
        let mut publish = self.publish_packet(now, packet_id, delivery, dup);
        if packet_id.is_none() && !self.fits(now, stream, delivery) {
            self.session.drops.too_large += 1;
            return Enqueued::TooLarge;
        }
        if self.version.is_v5() {
            let alias = self.outbound_aliases.get_mut(stream).lookup(&publish.topic);
            apply_alias(&mut publish, alias);
        }
        out.push_back((stream, Packet::Publish(publish)));
        Enqueued::Sent
    }

    /// Handles PUBACK.
    pub(crate) fn on_puback(&mut self, now: Instant, ack: PubResponse, out: &mut Transmits) {
        if let Ok(delivery) = self.session.outbound.puback(ack.packet_id) {
            self.answered(ack.packet_id);
            self.forget_flow(ack.packet_id);
            self.events.push_back(FlowEvent::Completed {
                packet_id: ack.packet_id,
                reason: ack.reason,
                delivery,
            });
            self.pump(now, out);
        }
    }

    /// Handles PUBREC received on `stream`: PUBREL on the stream the PUBLISH went, or the end
    /// of a refused flow.
    pub(crate) fn on_pubrec(
        &mut self,
        now: Instant,
        stream: StreamId,
        rec: PubResponse,
        out: &mut Transmits,
    ) {
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
                out.push_back((
                    self.flow_stream(id),
                    Packet::PubRel(PubResponse::success(id)),
                ));
            }
            Ok(Received::Refused(delivery)) => {
                self.answered(id);
                self.forget_flow(id);
                self.events.push_back(FlowEvent::Completed {
                    packet_id: id,
                    reason: rec.reason,
                    delivery,
                });
                self.pump(now, out);
            }
            // A PUBREC for a flow we no longer know: answer so the peer can finish its side.
            Err(FlowError::UnknownPacketId(_)) if !rec.reason.is_error() => {
                out.push_back((stream, Packet::PubRel(self.not_found(id))));
            }
            Err(_) => {}
        }
    }

    /// Handles PUBCOMP.
    pub(crate) fn on_pubcomp(&mut self, now: Instant, comp: PubResponse, out: &mut Transmits) {
        if let Ok(delivery) = self.session.outbound.pubcomp(comp.packet_id) {
            self.answered(comp.packet_id);
            self.forget_flow(comp.packet_id);
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

    /// Handles a PUBLISH received on `stream`, whose acknowledgement goes back on it. Returns
    /// the message to hand on, or `None` for a duplicate that was already answered.
    pub(crate) fn on_publish(
        &mut self,
        now: Instant,
        stream: StreamId,
        mut publish: Publish,
        out: &mut Transmits,
    ) -> Result<Option<InboundPublish>, Violation> {
        if publish.qos > self.local.maximum_qos {
            return Err(Violation::QoSNotSupported(publish.qos));
        }
        if publish.retain && !self.local.retain_available {
            return Err(Violation::RetainNotSupported);
        }
        let alias = publish.properties.topic_alias.take();
        if alias.is_some() {
            publish.topic = self
                .inbound_aliases
                .get_mut(stream)
                .resolve(publish.topic, alias)?;
        }
        let packet_id = publish.packet_id;
        if let Some(id) = packet_id {
            if self.awaiting_local_ack.contains_key(&id) {
                // A retransmission of a message we have not acknowledged yet: the answer is
                // already coming.
                return Ok(None);
            }
            if publish.qos == QoS::ExactlyOnce && self.session.inbound_qos2.contains(&id) {
                out.push_back((stream, Packet::PubRec(PubResponse::success(id))));
                return Ok(None);
            }
            let unacked = self.awaiting_local_ack.len() + self.session.inbound_qos2.len();
            if unacked >= usize::from(self.local.receive_maximum) {
                return Err(Violation::ReceiveMaximumExceeded(
                    self.local.receive_maximum,
                ));
            }
            self.awaiting_local_ack.insert(id, (publish.qos, stream));
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
    pub(crate) fn take_unacked(&mut self) -> SparseMap<PacketId, QoS> {
        self.awaiting_local_ack
            .take()
            .map(|(id, (qos, _))| (id, qos))
            .collect()
    }

    /// Acknowledges an incoming message once our side has made it safe: PUBACK for QoS 1,
    /// PUBREC for QoS 2, on the stream the message came on. Returns false if no message awaits
    /// acknowledgement under `id`.
    pub(crate) fn ack_inbound(
        &mut self,
        id: PacketId,
        reason: ReasonCode,
        out: &mut Transmits,
    ) -> bool {
        let Some((qos, stream)) = self.awaiting_local_ack.remove(&id) else {
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
            out.push_back((stream, Packet::PubRec(response)));
        } else {
            out.push_back((stream, Packet::PubAck(response)));
        }
        true
    }

    /// Handles PUBREL received on `stream`: always answered there with PUBCOMP, "not found" if
    /// the identifier is unknown.
    pub(crate) fn on_pubrel(&mut self, stream: StreamId, rel: PubResponse, out: &mut Transmits) {
        let id = rel.packet_id;
        if self.session.inbound_qos2.remove(&id) {
            self.events
                .push_back(FlowEvent::InboundReleased { packet_id: id });
            out.push_back((stream, Packet::PubComp(PubResponse::success(id))));
        } else {
            out.push_back((stream, Packet::PubComp(self.not_found(id))));
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
    unacked: &mut SparseMap<PacketId, QoS>,
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

/// Frees an emptied queue's buffer.
fn release_if_empty<T>(queue: &mut VecDeque<T>) {
    if queue.is_empty() && queue.capacity() > 0 {
        *queue = VecDeque::new();
    }
}
