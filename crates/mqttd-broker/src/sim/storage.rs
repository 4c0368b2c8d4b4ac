//! A storage for the simulation: it keeps nothing, numbers every change, logs what each one
//! was, and makes changes durable only when told to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use mqttd_proto::session::OutboundState;
use mqttd_proto::{ClientId, Delivery, Message, PacketId};

use crate::storage::{Recovered, SessionRecord, Storage, StorageError, Ticket, Watermark};

/// See the module documentation.
pub(crate) struct SimStorage {
    changes: AtomicU64,
    /// What each change was, by number (from 1).
    log: Mutex<Vec<String>>,
    watermark: watch::Sender<Watermark>,
}

impl Default for SimStorage {
    fn default() -> Self {
        Self {
            changes: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            watermark: watch::Sender::new(Watermark::default()),
        }
    }
}

impl SimStorage {
    fn record(&self, what: String) -> Ticket {
        let mut log = self.log.lock();
        log.push(what);
        Ticket::new(self.changes.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Makes every change recorded so far durable.
    pub(crate) fn make_durable(&self) {
        let recorded = self.changes.load(Ordering::SeqCst);
        self.watermark.send_if_modified(|w| {
            let moved = !w.failed && w.durable < recorded;
            if moved {
                w.durable = recorded;
            }
            moved
        });
    }

    /// The storage fails: nothing recorded from now on, or not durable yet, will be.
    pub(crate) fn fail(&self) {
        self.watermark.send_modify(|w| {
            w.fail();
        });
    }

    /// The storage works again: every change recorded so far that is not durable is lost.
    pub(crate) fn recover(&self) {
        let last = self.changes.load(Ordering::SeqCst);
        self.watermark.send_modify(|w| w.recover(last));
    }

    /// How far changes are durable.
    pub(crate) fn watermark_now(&self) -> Watermark {
        *self.watermark.borrow()
    }

    /// Changes recorded but not durable yet.
    pub(crate) fn pending(&self) -> Vec<String> {
        let durable = self.watermark_now().durable as usize;
        self.log.lock().iter().skip(durable).cloned().collect()
    }
}

impl Storage for SimStorage {
    fn recover(&self) -> Result<Recovered, StorageError> {
        Ok(Recovered::default())
    }

    fn retain(&self, message: &Arc<Message>) -> Ticket {
        self.record(format!("retain {}", message.topic))
    }

    fn save_session(&self, record: &SessionRecord) -> Ticket {
        self.record(format!("session {}", record.client_id))
    }

    fn remove_session(&self, client_id: &ClientId) -> Ticket {
        self.record(format!("remove session {client_id}"))
    }

    fn remove_messages(&self, client_id: &ClientId) -> Ticket {
        self.record(format!("remove messages {client_id}"))
    }

    fn store_delivery(&self, client_id: &ClientId, delivery: &Delivery) -> Ticket {
        match delivery.store_seq {
            Some(seq) => self.record(format!("store {client_id} {seq}")),
            None => Ticket::NONE,
        }
    }

    fn delivery_flow(
        &self,
        client_id: &ClientId,
        store_seq: u64,
        packet_id: PacketId,
        state: OutboundState,
    ) -> Ticket {
        self.record(format!(
            "flow {client_id} {store_seq} {packet_id} {state:?}"
        ))
    }

    fn delivery_done(&self, client_id: &ClientId, delivery: &Delivery) -> Ticket {
        match delivery.store_seq {
            Some(seq) => self.record(format!("done {client_id} {seq}")),
            None => Ticket::NONE,
        }
    }

    fn pending_release(&self, client_id: &ClientId, packet_id: PacketId, pending: bool) -> Ticket {
        self.record(format!("pubrel {client_id} {packet_id} {pending}"))
    }

    fn watermark(&self) -> watch::Receiver<Watermark> {
        self.watermark.subscribe()
    }
}
