//! What the broker's integration tests share: a storage that records every change as a line
//! and makes changes durable when the test says so; and, in [`quic`], what the QUIC tests
//! share.

#![allow(dead_code)]

pub(crate) mod quic;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use mqttd_broker::storage::{
    Recovered, SessionRecord, StorageError, StoredSession, Ticket, Watermark,
};
use mqttd_broker::Storage;
use mqttd_proto::session::OutboundState;
use mqttd_proto::{ClientId, Delivery, Message, PacketId};
use tokio::sync::watch;
use tokio::time::timeout;

use mqttd_client::Events;

/// Upper bound for anything that must happen; only a hang reaches it.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// Storage that records every change as a line ("store sub t", "save c [\"t\"]", ...), recovers
/// a given state, makes changes durable at once unless the test holds the watermark, and lets
/// the test wait until it saw a given change.
#[derive(Clone)]
pub(crate) struct RecordingStorage(Arc<Shared>);

struct Shared {
    log: watch::Sender<Vec<String>>,
    written: AtomicU64,
    held: AtomicBool,
    watermark: watch::Sender<Watermark>,
    recovered_retained: Vec<Arc<Message>>,
    recovered_sessions: Vec<StoredSession>,
}

impl RecordingStorage {
    /// Recovers nothing; changes are durable at once until [`Self::hold`].
    pub(crate) fn new() -> Self {
        Self::recovering(Vec::new(), Vec::new())
    }

    /// Recovers these retained messages and sessions.
    pub(crate) fn recovering(retained: Vec<Arc<Message>>, sessions: Vec<StoredSession>) -> Self {
        Self(Arc::new(Shared {
            log: watch::Sender::new(Vec::new()),
            written: AtomicU64::new(0),
            held: AtomicBool::new(false),
            watermark: watch::Sender::new(Watermark::default()),
            recovered_retained: retained,
            recovered_sessions: sessions,
        }))
    }

    fn note(&self, line: String) -> Ticket {
        // Counted before it is visible, so that a release after seeing it covers it.
        let written = self.0.written.fetch_add(1, Ordering::SeqCst) + 1;
        self.0.log.send_modify(|log| log.push(line));
        if !self.0.held.load(Ordering::SeqCst) {
            self.0
                .watermark
                .send_modify(|w| w.durable = w.durable.max(written));
        }
        Ticket::new(written)
    }

    /// From now on, nothing more becomes durable until [`Self::release`] or
    /// [`Self::sync_held`].
    pub(crate) fn hold(&self) {
        self.0.held.store(true, Ordering::SeqCst);
    }

    /// Makes everything recorded so far durable, and what follows durable at once.
    pub(crate) fn release(&self) {
        self.0.held.store(false, Ordering::SeqCst);
        self.sync_held();
    }

    /// Makes everything recorded so far durable; what follows waits, if the watermark is held.
    pub(crate) fn sync_held(&self) {
        let written = self.0.written.load(Ordering::SeqCst);
        self.0
            .watermark
            .send_modify(|w| w.durable = w.durable.max(written));
    }

    /// The storage fails: nothing recorded after the watermark will ever be durable.
    pub(crate) fn fail(&self) {
        self.0.held.store(true, Ordering::SeqCst);
        self.0.watermark.send_modify(|w| {
            w.fail();
        });
    }

    /// How many changes were recorded: pass it to [`Self::saw`] to look only at later ones.
    pub(crate) fn mark(&self) -> usize {
        self.0.log.borrow().len()
    }

    /// Every change recorded so far, in order.
    pub(crate) fn log(&self) -> Vec<String> {
        self.0.log.borrow().clone()
    }

    /// Waits until a change recorded after `mark` matches.
    pub(crate) async fn saw(&self, mark: usize, what: impl Fn(&str) -> bool) {
        let mut rx = self.0.log.subscribe();
        let found = timeout(
            WAIT,
            rx.wait_for(|log| log.iter().skip(mark).any(|l| what(l))),
        )
        .await;
        assert!(
            matches!(found, Ok(Ok(_))),
            "expected change not recorded: {:?}",
            &self.0.log.borrow()[mark..]
        );
    }
}

impl Storage for RecordingStorage {
    fn recover(&self) -> Result<Recovered, StorageError> {
        Ok(Recovered {
            retained: self.0.recovered_retained.clone(),
            sessions: self.0.recovered_sessions.clone(),
            next_seq: 1,
            ..Recovered::default()
        })
    }

    fn retain(&self, message: &Arc<Message>) -> Ticket {
        self.note(format!("retain {}", message.topic))
    }

    fn save_session(&self, record: &SessionRecord) -> Ticket {
        let filters: Vec<_> = record
            .subscriptions
            .iter()
            .map(|s| s.0.to_string())
            .collect();
        self.note(format!("save {} {:?}", record.client_id, filters))
    }

    fn remove_session(&self, client_id: &ClientId) -> Ticket {
        self.note(format!("remove {client_id}"))
    }

    fn remove_messages(&self, client_id: &ClientId) -> Ticket {
        self.note(format!("remove messages {client_id}"))
    }

    fn store_delivery(&self, client_id: &ClientId, delivery: &Delivery) -> Ticket {
        self.note(format!("store {client_id} {}", delivery.message.topic))
    }

    fn delivery_flow(
        &self,
        client_id: &ClientId,
        _: u64,
        packet_id: PacketId,
        s: OutboundState,
    ) -> Ticket {
        self.note(format!("flow {client_id} {packet_id} {s:?}"))
    }

    fn delivery_done(&self, client_id: &ClientId, delivery: &Delivery) -> Ticket {
        self.note(format!("done {client_id} {:?}", delivery.store_seq))
    }

    fn pending_release(&self, client_id: &ClientId, packet_id: PacketId, pending: bool) -> Ticket {
        self.note(format!("inbound {client_id} {packet_id} {pending}"))
    }

    fn watermark(&self) -> watch::Receiver<Watermark> {
        self.0.watermark.subscribe()
    }
}

/// The payload of the next message `events` delivers.
pub(crate) async fn next_bytes(events: &mut Events) -> Bytes {
    let p = timeout(WAIT, events.next_message())
        .await
        .expect("message in time")
        .expect("open");
    p.message.payload
}

/// The payload of the next message `events` delivers, as text.
pub(crate) async fn next_payload(events: &mut Events) -> String {
    String::from_utf8(next_bytes(events).await.to_vec()).expect("a text payload")
}
