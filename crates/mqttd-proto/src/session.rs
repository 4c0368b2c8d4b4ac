//! The state of a session that outlives any one connection.
//!
//! A [`Session`] holds what MQTT requires to survive a reconnect: outgoing QoS 1 and 2 messages
//! in flight and queued, the identifiers of incoming QoS 2 messages awaiting PUBREL, the will
//! waiting for its delay, and the expiry clock. While a client is connected its connection state
//! machine owns the session; between connections the broker holds it and drives its timers with
//! [`Session::poll_timeout`] and [`Session::handle_timeout`].
//!
//! The same type serves the client role, where "outgoing" means the client's own publications.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::message::{Delivery, Message};
use crate::packet::Will;
use crate::types::{ClientId, PacketId, QoS, StreamId};

/// A session expiry interval that means "never expires".
pub const NEVER_EXPIRES: u32 = u32::MAX;

/// Bounds on what a session may queue while its client is slow or away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most messages queued (not yet in flight); Mosquitto's `max_queued_messages`.
    pub max_messages: usize,
    /// Most payload and property bytes queued; Mosquitto's `max_queued_bytes` (0: unlimited).
    pub max_bytes: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self {
            max_messages: 1000,
            max_bytes: 0,
        }
    }
}

/// What happened to a message handed to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Enqueued {
    /// Sent on the connection now.
    Sent,
    /// Queued until the client's receive window or connection allows it.
    Queued,
    /// Dropped: the queue is full. Policy: the newest message is the one dropped, as Mosquitto
    /// does, so what a client already waits for is never reordered or lost.
    QueueFull,
    /// Dropped: the message expired before it could be sent.
    Expired,
    /// Dropped: the message is larger than the client's maximum packet size [MQTT-3.1.2-25].
    TooLarge,
    /// Nothing done: the connection has no session (CONNECT not yet accepted, or the session
    /// was already taken after close).
    NotConnected,
}

/// The sender's side of one QoS 1 or QoS 2 flow.
///
/// ```text
///   QoS 1:  PUBLISH sent --PUBACK--> done
///   QoS 2:  PUBLISH sent --PUBREC--> PUBREL sent --PUBCOMP--> done
///                        --PUBREC >= 0x80--> done (the receiver refused it)
/// ```
/// On a new connection every flow is resumed from its state: a PUBLISH is resent with DUP set,
/// a PUBREL is resent as is [MQTT-4.4.0-1].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundState {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    PublishSent,
    /// PUBREL sent, waiting for PUBCOMP.
    ReleaseSent,
}

/// A message in flight from this side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// The message.
    pub delivery: Delivery,
    /// Where its flow stands.
    pub state: OutboundState,
    /// Position in sending order, so that a reconnect resends in the original order.
    pub(crate) seq: u64,
}

/// Why an acknowledgement did not match a message in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlowError {
    /// No message is in flight with this identifier.
    #[error("no message in flight with packet identifier {0}")]
    UnknownPacketId(PacketId),
    /// The acknowledgement does not fit the message's QoS or state.
    #[error("acknowledgement does not match the state of packet identifier {0}")]
    WrongState(PacketId),
}

/// Outcome of a PUBREC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Received {
    /// Send PUBREL.
    Release,
    /// The receiver refused the message; the flow is over.
    Refused(Delivery),
}

/// Outgoing messages: packet identifiers, the flows in flight and the queue behind them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outbound {
    next_id: Option<PacketId>,
    next_seq: u64,
    in_flight: BTreeMap<PacketId, InFlight>,
    /// Queued messages with the stream their subscription asked for: a hint of the current
    /// connection, reset to the control stream when the session is resumed.
    queue: VecDeque<(Delivery, StreamId)>,
    queued_bytes: usize,
    /// Identifiers the connection holds for other packets (a client's SUBSCRIBE and
    /// UNSUBSCRIBE awaiting their answer), which a new flow must not take [MQTT-2.2.1-3].
    pub(crate) reserved: BTreeSet<PacketId>,
}

impl Outbound {
    pub(crate) fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }

    /// Starts a QoS 1 or 2 flow, choosing a free packet identifier.
    pub(crate) fn start(&mut self, delivery: Delivery) -> Option<PacketId> {
        let mut id = self.next_id.unwrap_or(PacketId::MIN);
        for _ in 0..=u16::MAX {
            if !self.in_flight.contains_key(&id) && !self.reserved.contains(&id) {
                self.next_id = Some(id.next());
                let seq = self.next_seq;
                self.next_seq += 1;
                self.in_flight.insert(
                    id,
                    InFlight {
                        delivery,
                        state: OutboundState::PublishSent,
                        seq,
                    },
                );
                return Some(id);
            }
            id = id.next();
        }
        None
    }

    pub(crate) fn puback(&mut self, id: PacketId) -> Result<Delivery, FlowError> {
        let entry = self
            .in_flight
            .get(&id)
            .ok_or(FlowError::UnknownPacketId(id))?;
        if entry.delivery.qos != QoS::AtLeastOnce {
            return Err(FlowError::WrongState(id));
        }
        self.remove(id)
    }

    pub(crate) fn pubrec(&mut self, id: PacketId, refused: bool) -> Result<Received, FlowError> {
        let entry = self
            .in_flight
            .get_mut(&id)
            .ok_or(FlowError::UnknownPacketId(id))?;
        if entry.delivery.qos != QoS::ExactlyOnce {
            return Err(FlowError::WrongState(id));
        }
        if refused && entry.state == OutboundState::PublishSent {
            return self.remove(id).map(Received::Refused);
        }
        entry.state = OutboundState::ReleaseSent;
        Ok(Received::Release)
    }

    pub(crate) fn pubcomp(&mut self, id: PacketId) -> Result<Delivery, FlowError> {
        let entry = self
            .in_flight
            .get(&id)
            .ok_or(FlowError::UnknownPacketId(id))?;
        if entry.state != OutboundState::ReleaseSent {
            return Err(FlowError::WrongState(id));
        }
        self.remove(id)
    }

    pub(crate) fn remove(&mut self, id: PacketId) -> Result<Delivery, FlowError> {
        self.in_flight
            .remove(&id)
            .map(|e| e.delivery)
            .ok_or(FlowError::UnknownPacketId(id))
    }

    /// Flows to resume on a new connection, in their original order.
    pub(crate) fn resume_order(&self) -> Vec<PacketId> {
        let mut ids: Vec<_> = self.in_flight.iter().map(|(id, e)| (e.seq, *id)).collect();
        ids.sort_unstable();
        ids.into_iter().map(|(_, id)| id).collect()
    }

    pub(crate) fn get(&self, id: PacketId) -> Option<&InFlight> {
        self.in_flight.get(&id)
    }

    pub(crate) fn push(
        &mut self,
        delivery: Delivery,
        stream: StreamId,
        limits: QueueLimits,
    ) -> Enqueued {
        let weight = delivery.message.weight();
        let over_bytes = limits.max_bytes > 0 && self.queued_bytes + weight > limits.max_bytes;
        if self.queue.len() >= limits.max_messages || over_bytes {
            return Enqueued::QueueFull;
        }
        self.queued_bytes += weight;
        self.queue.push_back((delivery, stream));
        Enqueued::Queued
    }

    /// The next queued message that has not expired; expired ones are dropped on the way and
    /// counted in `expired`.
    pub(crate) fn pop(&mut self, now: Instant, expired: &mut u64) -> Option<(Delivery, StreamId)> {
        while let Some((d, stream)) = self.queue.pop_front() {
            self.queued_bytes = self.queued_bytes.saturating_sub(d.message.weight());
            if d.message.is_expired(now) {
                *expired += 1;
                continue;
            }
            return Some((d, stream));
        }
        None
    }

    /// Queued messages bound for `from` go to `to` instead.
    pub(crate) fn move_queued(&mut self, from: StreamId, to: StreamId) {
        for (_, stream) in &mut self.queue {
            if *stream == from {
                *stream = to;
            }
        }
    }

    /// Frees the queue's buffer if it is empty.
    pub(crate) fn release_if_empty(&mut self) {
        if self.queue.is_empty() && self.queue.capacity() > 0 {
            self.queue = VecDeque::new();
        }
    }

    pub(crate) fn queue_is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// A [`Session`] with nothing in flight, nothing queued and no QoS 2 message awaiting PUBREL,
/// in its smallest form: what an idle connection keeps while it waits (see
/// [`ParkedConnection`](crate::server::ParkedConnection)). [`Self::into_session`] gives the
/// same session back.
#[derive(Debug)]
pub(crate) struct IdleSession {
    client_id: ClientId,
    expiry_interval: u32,
    next_id: Option<PacketId>,
    next_seq: u64,
    limits: QueueLimits,
    will: Option<Box<PendingWill>>,
    expires_at: Option<Instant>,
    drops: DropCounters,
}

impl IdleSession {
    /// The session again, as it was.
    pub(crate) fn into_session(self) -> Session {
        let Self {
            client_id,
            expiry_interval,
            next_id,
            next_seq,
            limits,
            will,
            expires_at,
            drops,
        } = self;
        Session {
            client_id,
            expiry_interval,
            limits,
            outbound: Outbound {
                next_id,
                next_seq,
                ..Outbound::default()
            },
            inbound_qos2: BTreeSet::new(),
            will,
            expires_at,
            drops,
        }
    }
}

/// A will waiting for its delay to pass.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PendingWill {
    will: Will,
    due: Instant,
}

/// What a session's timer produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// The will delay passed: publish this message.
    WillDue(Message),
    /// The session expired: discard it, and publish the will if there is one (a session that
    /// ends before its will delay publishes the will then [MQTT-3.1.3-9]).
    Expired {
        /// The will to publish now.
        will: Option<Message>,
    },
}

/// Counters of messages a session dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DropCounters {
    /// Dropped because the queue was full.
    pub queue_full: u64,
    /// Dropped because they expired while queued.
    pub expired: u64,
    /// Dropped because they exceeded the client's maximum packet size.
    pub too_large: u64,
}

/// A session: the state MQTT keeps across connections for one client identifier.
#[derive(Debug, Clone)]
pub struct Session {
    client_id: ClientId,
    expiry_interval: u32,
    limits: QueueLimits,
    pub(crate) outbound: Outbound,
    /// Incoming QoS 2 messages acknowledged with PUBREC and awaiting PUBREL; a PUBLISH that
    /// reuses one of these identifiers is a duplicate and is not delivered again.
    pub(crate) inbound_qos2: BTreeSet<PacketId>,
    /// Boxed: most sessions have none, and every connection pays the inline size.
    will: Option<Box<PendingWill>>,
    expires_at: Option<Instant>,
    pub(crate) drops: DropCounters,
}

impl Session {
    /// A fresh session.
    pub fn new(client_id: ClientId, expiry_interval: u32, limits: QueueLimits) -> Self {
        Self {
            client_id,
            expiry_interval,
            limits,
            outbound: Outbound::default(),
            inbound_qos2: BTreeSet::new(),
            will: None,
            expires_at: None,
            drops: DropCounters::default(),
        }
    }

    /// Whether the session holds nothing but its identity, settings and counters: no message
    /// in flight or queued, no identifier reserved, no QoS 2 message awaiting PUBREL.
    pub(crate) fn is_idle(&self) -> bool {
        self.outbound.in_flight.is_empty()
            && self.outbound.queue.is_empty()
            && self.outbound.queued_bytes == 0
            && self.outbound.reserved.is_empty()
            && self.inbound_qos2.is_empty()
    }

    /// The session in its smallest form. Only for an idle session ([`Self::is_idle`]): the
    /// in-flight map and the queue are dropped, and with them whatever they held.
    pub(crate) fn into_idle(self) -> IdleSession {
        debug_assert!(self.is_idle());
        // Named one by one, so that a field added later is not forgotten here.
        let Self {
            client_id,
            expiry_interval,
            limits,
            outbound:
                Outbound {
                    next_id,
                    next_seq,
                    in_flight: _,
                    queue: _,
                    queued_bytes: _,
                    reserved: _,
                },
            inbound_qos2: _,
            will,
            expires_at,
            drops,
        } = self;
        IdleSession {
            client_id,
            expiry_interval,
            next_id,
            next_seq,
            limits,
            will,
            expires_at,
            drops,
        }
    }

    /// The client identifier.
    pub fn client_id(&self) -> &ClientId {
        &self.client_id
    }

    /// Seconds the session lives after its connection closes; [`NEVER_EXPIRES`] for ever.
    pub fn expiry_interval(&self) -> u32 {
        self.expiry_interval
    }

    /// Changes the expiry interval (CONNECT of a resuming client, or DISCONNECT).
    pub fn set_expiry_interval(&mut self, secs: u32) {
        self.expiry_interval = secs;
    }

    /// The queue bounds.
    pub fn limits(&self) -> QueueLimits {
        self.limits
    }

    /// How many messages are in flight.
    pub fn in_flight_len(&self) -> usize {
        self.outbound.in_flight_len()
    }

    /// Messages in flight, in identifier order.
    pub fn in_flight(&self) -> impl Iterator<Item = (PacketId, &InFlight)> {
        self.outbound.in_flight.iter().map(|(id, e)| (*id, e))
    }

    /// Messages queued behind the in-flight window, oldest first.
    pub fn queued(&self) -> impl ExactSizeIterator<Item = &Delivery> {
        self.outbound.queue.iter().map(|(d, _)| d)
    }

    /// Bytes held by queued messages.
    pub fn queued_bytes(&self) -> usize {
        self.outbound.queued_bytes
    }

    /// Identifiers of incoming QoS 2 messages awaiting PUBREL.
    pub fn pending_releases(&self) -> impl Iterator<Item = PacketId> + '_ {
        self.inbound_qos2.iter().copied()
    }

    /// Messages this session dropped.
    pub fn drops(&self) -> DropCounters {
        self.drops
    }

    /// Queues a message for a client that is not connected.
    pub fn enqueue(&mut self, now: Instant, delivery: Delivery) -> Enqueued {
        self.enqueue_on(now, StreamId::CONTROL, delivery)
    }

    /// Queues a message to be sent on `stream` of the current connection.
    pub(crate) fn enqueue_on(
        &mut self,
        now: Instant,
        stream: StreamId,
        delivery: Delivery,
    ) -> Enqueued {
        if delivery.message.is_expired(now) {
            self.drops.expired += 1;
            return Enqueued::Expired;
        }
        let outcome = self.outbound.push(delivery, stream, self.limits);
        if outcome == Enqueued::QueueFull {
            self.drops.queue_full += 1;
        }
        outcome
    }

    /// Records that the connection closed at `now`, with the will to publish after `delay`
    /// (`None` when the client disconnected normally). Starts the expiry clock. A broker that
    /// restores a session from storage calls it with the time the connection was lost.
    pub fn disconnected(&mut self, now: Instant, will: Option<(Will, u32)>) {
        self.will = will.map(|(will, delay)| {
            Box::new(PendingWill {
                will,
                due: now + Duration::from_secs(delay.into()),
            })
        });
        self.expires_at = (self.expiry_interval != NEVER_EXPIRES)
            .then(|| now + Duration::from_secs(self.expiry_interval.into()));
    }

    /// Records that a client resumed the session: a pending will is cancelled
    /// [MQTT-3.1.3-9] and the expiry clock stops. Stream hints belonged to the previous
    /// connection: everything queued now goes on the control stream.
    pub(crate) fn resumed(&mut self) {
        self.will = None;
        self.expires_at = None;
        for (_, stream) in &mut self.outbound.queue {
            *stream = StreamId::CONTROL;
        }
    }

    /// When this session's next timer is due: a delayed will or its expiry.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.will.as_ref().map(|w| w.due), self.expires_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<SessionEvent> {
        if self.expires_at.is_some_and(|at| at <= now) {
            self.expires_at = None;
            let will = self.will.take().map(|w| Message::from_will(w.will, now));
            return Some(SessionEvent::Expired { will });
        }
        if self.will.as_ref().is_some_and(|w| w.due <= now) {
            let w = self.will.take()?;
            return Some(SessionEvent::WillDue(Message::from_will(w.will, now)));
        }
        None
    }

    /// Ends the session now (a clean start replaced it, or the broker discards it): returns
    /// the pending will, which must be published.
    pub fn end(&mut self, now: Instant) -> Option<Message> {
        self.expires_at = None;
        self.will.take().map(|w| Message::from_will(w.will, now))
    }

    /// Replaces the client identifier (the server assigned one).
    pub(crate) fn set_client_id(&mut self, client_id: ClientId) {
        self.client_id = client_id;
    }

    /// The peer kept no session state for us, so no flow in flight is known to it any more
    /// [MQTT-3.2.2-5]. Messages it never acknowledged go back to the front of the queue, in
    /// order, to be sent as new publications; those it already received (PUBREC) are done;
    /// incoming QoS 2 state is dropped.
    pub(crate) fn reset_in_flight(&mut self) {
        let order = self.outbound.resume_order();
        for id in order.into_iter().rev() {
            let Some(entry) = self.outbound.in_flight.remove(&id) else {
                continue;
            };
            if entry.state == OutboundState::PublishSent {
                self.outbound.queued_bytes += entry.delivery.message.weight();
                self.outbound
                    .queue
                    .push_front((entry.delivery, StreamId::CONTROL));
            }
        }
        self.inbound_qos2.clear();
    }

    /// Whether a will is waiting for its delay.
    pub fn has_pending_will(&self) -> bool {
        self.will.is_some()
    }

    /// The will waiting for its delay, and when it is due.
    pub fn pending_will(&self) -> Option<(&Will, Instant)> {
        self.will.as_ref().map(|w| (&w.will, w.due))
    }

    /// Puts back a message that was in flight when the session was stored, under the packet
    /// identifier it went out with, to be resumed on the next connection. Flows resume in
    /// the order they are restored.
    pub fn restore_in_flight(
        &mut self,
        packet_id: PacketId,
        delivery: Delivery,
        state: OutboundState,
    ) {
        let seq = self.outbound.next_seq;
        self.outbound.next_seq += 1;
        self.outbound.in_flight.insert(
            packet_id,
            InFlight {
                delivery,
                state,
                seq,
            },
        );
    }

    /// Puts back the identifier of an incoming QoS 2 message that awaited PUBREL when the
    /// session was stored, so that its resend is still recognised as a duplicate.
    pub fn restore_pending_release(&mut self, packet_id: PacketId) {
        self.inbound_qos2.insert(packet_id);
    }
}
