//! Work a connection carries out at the pace of others: retained messages sent as the client
//! reads, and publications that wait for room in their subscribers' queues.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::time::Instant;

use mqttd_proto::{Delivery, InboundPublish, PacketId, ReasonCode, StreamId, SubscriptionOptions};

use crate::broker::Blocked;
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
    pub(super) deliveries: Blocked,
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

/// The sum of the progress counters of the sessions `blocked` waits for.
pub(super) fn progress_of(blocked: &Blocked) -> u64 {
    blocked
        .iter()
        .map(|(h, _)| h.progress.load(Ordering::Relaxed))
        .fold(0, u64::wrapping_add)
}
