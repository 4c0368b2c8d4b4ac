//! Work a connection carries out at the pace of others: retained messages sent as the client
//! reads, and publications that wait for room in their subscribers' queues.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use mqttd_proto::{
    Delivery, InboundPublish, Message, PacketId, ReasonCode, StreamId, SubscriptionOptions,
};

use crate::broker::{Blocked, SessionHandle, Waits};
use crate::retained::RetainedCursor;

/// Retained messages being sent for new subscriptions, from snapshots of the store, as the
/// client makes room for them. Messages routed to the session meanwhile wait behind them, so
/// that a retained message never arrives after a newer one on its topic.
#[derive(Default)]
pub(super) struct RetainedFeed {
    /// One per subscription that asked for retained messages, in order.
    pub(super) cursors: VecDeque<(RetainedCursor, SubscriptionOptions, Option<NonZeroU32>)>,
    /// The next one, taken from a cursor but not yet sent for lack of room.
    pub(super) next: Option<Delivery>,
    /// Messages routed to the session meanwhile, in arrival order.
    pub(super) deferred: VecDeque<Delivery>,
}

impl RetainedFeed {
    /// The next retained message to send, if any is left.
    pub(super) fn next(&mut self, now: Instant) -> Option<Delivery> {
        if let Some(d) = self.next.take() {
            return Some(d);
        }
        while let Some((cursor, options, id)) = self.cursors.front_mut() {
            if let Some(message) = cursor.next(now) {
                return Some(Delivery {
                    qos: message.qos.min(options.qos),
                    retain: true,
                    subscription_ids: id.iter().copied().collect(),
                    shared: None,
                    store_seq: None,
                    message,
                });
            }
            self.cursors.pop_front();
        }
        None
    }
}

/// A publication waiting for room in subscriber queues or output, with its stream's reading
/// paused meanwhile.
pub(super) struct BlockedPublish {
    /// The stream it came on, which is not read from meanwhile.
    pub(super) stream: StreamId,
    /// Its packet identifier, to acknowledge once it is handed over; none for QoS 0.
    pub(super) packet_id: Option<PacketId>,
    pub(super) reason: ReasonCode,
    pub(super) held: Held,
    /// When the sessions waited for last made progress.
    pub(super) since: Instant,
    /// When it last looked for room.
    pub(super) tried: Instant,
    /// Their progress counters, summed, as of `since`.
    pub(super) progress: u64,
    /// Publications from the same stream that arrived meanwhile (already read with it): they
    /// are routed after it, in order.
    pub(super) later: VecDeque<InboundPublish>,
}

/// What of a waiting publication waits.
pub(super) enum Held {
    /// The copies of a QoS 0 or 1 publication that found their sessions without room; the
    /// other copies were handed over.
    Copies(Blocked),
    /// A QoS 2 publication not routed at all yet, and the sessions it waits for room in: it
    /// is routed whole once they have room (see `Inner::route_whole`), so that one atomic
    /// write covers every copy and the PUBREL state, and nothing has been routed should the
    /// connection end first (the publisher sends it again, unacknowledged).
    Whole { message: Arc<Message>, waits: Waits },
}

impl Held {
    /// Whether nothing waits any more.
    pub(super) fn is_empty(&self) -> bool {
        match self {
            Self::Copies(blocked) => blocked.is_empty(),
            Self::Whole { waits, .. } => waits.is_empty(),
        }
    }

    /// The sessions waited for.
    pub(super) fn sessions(&self) -> impl Iterator<Item = &Arc<SessionHandle>> {
        let (copies, whole) = match self {
            Self::Copies(blocked) => (Some(blocked), None),
            Self::Whole { waits, .. } => (None, Some(waits)),
        };
        let copies = copies.into_iter().flat_map(|b| b.iter().map(|(h, _)| h));
        copies.chain(whole.into_iter().flat_map(|w| w.iter()))
    }

    /// The sum of the progress counters of the sessions waited for.
    pub(super) fn progress(&self) -> u64 {
        self.sessions()
            .map(|h| h.progress.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}
