//! Where the broker's durable state goes.
//!
//! The broker keeps its working state in memory and tells a [`Storage`] about every change that
//! must survive a crash: persistent sessions and their subscriptions and wills, every QoS 1
//! and 2 message routed to one of them and where its flow stands, incoming QoS 2 identifiers
//! awaiting PUBREL, and retained messages. The call that records a change returns its
//! [`Ticket`]; the storage makes changes durable in groups and publishes how far it got
//! ([`Storage::watermark`]). A connection holds back any packet that depends on a change
//! (PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, CONNACK, a PUBLISH of a stored message) until
//! the watermark passes the ticket it was handed: persist, then acknowledge, without
//! blocking the connection's reading meanwhile.
//!
//! Changes that must stand or fall together (everything one publication changes) go through
//! a [`Batch`]: a guard that collects them and writes them in one atomic write when it is
//! committed. A batch cannot be sent to another thread, so a task that holds one across an
//! `.await` does not compile as a spawned task: nothing can slip in between recording a
//! change and handing its ticket to the output that waits for it.
//!
//! [`MemoryStorage`] keeps nothing beyond the broker's own memory; [`DiskStorage`] keeps an
//! embedded store in the data directory.

use std::marker::PhantomData;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;

use mqttd_proto::session::OutboundState;
use mqttd_proto::{ClientId, Delivery, Message, PacketId, SubscriptionOptions, TopicFilter, Will};

#[cfg(test)]
mod crash_points;
mod disk;
pub(crate) mod record;

pub use disk::DiskStorage;
pub(crate) use disk::ErrorCounters;
pub use record::RecordError;

/// Entry points for the fuzz targets (`fuzz/`), which feed arbitrary bytes to the decoders
/// of stored records, and the encoders their seeds are written with. Not part of the API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use bytes::Bytes;
    use mqttd_proto::session::OutboundState;
    use mqttd_proto::{Delivery, Message, PacketId};

    use super::record::{self, Clock};
    use super::SessionRecord;

    /// Decodes `data` as every kind of stored record and returns the kinds it is valid as
    /// (`"delivery"`, `"session"`, `"message"`, `"flow"`). Whatever a value decodes to must be
    /// encoded back to exactly these bytes, which decode to an equal record (every field,
    /// expiry times included).
    pub fn decode_stored_records(data: &[u8]) -> Vec<&'static str> {
        let mut kinds = Vec::new();
        let clock = Clock::now();
        let id = mqttd_proto::ClientId::try_from("fuzz").unwrap_or_default();
        if let Ok(d) = record::decode_delivery(data, 1, &clock) {
            let encoded = record::encode_delivery(&d, &clock);
            assert_eq!(encoded, data, "delivery {d:?} re-encodes differently");
            assert_eq!(record::decode_delivery(&encoded, 1, &clock), Ok(d));
            kinds.push("delivery");
        }
        if let Ok(s) = record::decode_session(data, id.clone()) {
            let encoded = record::encode_session(&s);
            assert_eq!(encoded, data, "session {s:?} re-encodes differently");
            assert_eq!(record::decode_session(&encoded, id), Ok(s));
            kinds.push("session");
        }
        if let Ok(m) = record::decode_message(data, &clock) {
            let encoded = record::encode_message(&m, &clock);
            assert_eq!(encoded, data, "message {m:?} re-encodes differently");
            assert_eq!(record::decode_message(&encoded, &clock), Ok(m));
            kinds.push("message");
        }
        if let Ok((id, state)) = record::decode_flow(data) {
            let encoded = record::encode_flow(id, state);
            assert_eq!(
                encoded, data,
                "flow {id:?} {state:?} re-encodes differently"
            );
            assert_eq!(record::decode_flow(&encoded), Ok((id, state)));
            kinds.push("flow");
        }
        kinds
    }

    /// A retained message as the store keeps it.
    pub fn encode_message(message: &Message) -> Bytes {
        record::encode_message(message, &Clock::now())
    }

    /// A message stored for a session.
    pub fn encode_delivery(delivery: &Delivery) -> Bytes {
        record::encode_delivery(delivery, &Clock::now())
    }

    /// A session's record.
    pub fn encode_session(session: &SessionRecord) -> Bytes {
        record::encode_session(session)
    }

    /// Where a stored QoS 2 message's flow stands.
    pub fn encode_flow(packet_id: PacketId, state: OutboundState) -> Bytes {
        record::encode_flow(packet_id, state)
    }
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The storage could not be read or written.
    #[error("storage I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Stored data is damaged beyond what can be recovered.
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    /// The storage engine failed.
    #[error("{0}")]
    Engine(String),
}

/// How hard the broker works to keep what it acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledge only once the change is on stable storage (fsync), in groups: nothing
    /// acknowledged is lost, even on power loss.
    #[default]
    Sync,
    /// Acknowledge once the change is written to the operating system, and fsync at least
    /// every `durability_interval`: a crash of the broker loses nothing acknowledged; a
    /// crash of the machine loses up to that interval.
    Batch,
    /// Acknowledge at once and write in the background every `durability_interval`: a crash
    /// of the broker or the machine loses up to that interval of acknowledged messages.
    None,
}

/// A will as stored with its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWill {
    /// The will message.
    pub will: Will,
    /// Its delay in seconds.
    pub delay: u32,
}

/// What a session looks like on disk, apart from its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Client identifier.
    pub client_id: ClientId,
    /// Session expiry interval in seconds (0: the session ends with its connection, and is
    /// stored only for its will).
    pub expiry_interval: u32,
    /// Subscriptions with their options and identifiers.
    pub subscriptions: Vec<(TopicFilter, SubscriptionOptions, Option<NonZeroU32>)>,
    /// The will: the connected client's, or the one waiting for its delay.
    pub will: Option<StoredWill>,
    /// When the connection ended; `None` while a client is connected.
    pub disconnected_at: Option<SystemTime>,
}

/// A stored message of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDelivery {
    /// The message as the session receives it, [`Delivery::store_seq`] set.
    pub delivery: Delivery,
    /// For a QoS 2 message in flight: its packet identifier and state.
    pub flow: Option<(PacketId, OutboundState)>,
}

/// A stored session with everything that belongs to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// The session record.
    pub record: SessionRecord,
    /// Its messages in the order they were routed to it.
    pub deliveries: Vec<StoredDelivery>,
    /// Incoming QoS 2 identifiers awaiting PUBREL.
    pub pending_releases: Vec<PacketId>,
}

/// State found at startup.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Retained messages.
    pub retained: Vec<Arc<Message>>,
    /// Stored sessions.
    pub sessions: Vec<StoredSession>,
    /// When the previous run was last known to be alive, if it did not shut down cleanly:
    /// the connections it had were lost then.
    pub crashed_at: Option<SystemTime>,
    /// The next free [`Delivery::store_seq`].
    pub next_seq: u64,
}

/// What a PUBLISH waits for before it leaves ([`Storage::delivery_fence`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fence {
    /// The change it waits for.
    pub ticket: Ticket,
    /// Not written by then (its process was paused, or the client reads slowly), it needs
    /// another fence; `None`: it may wait as long as it must.
    pub until: Option<std::time::Instant>,
}

/// The number of a recorded change: output that depends on the change waits until the
/// [`Watermark`] covers it. Numbers grow in the order changes are recorded, across threads,
/// so the later of two tickets covers both; [`Ticket::NONE`] is covered from the start.
#[must_use = "output that depends on a recorded change must wait for its ticket"]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ticket(u64);

impl Ticket {
    /// Nothing to wait for: no change was recorded, or none that needs to be durable.
    pub const NONE: Self = Self(0);

    /// The ticket of change number `number` (numbers start at 1): for implementations of
    /// [`Storage`], which number their changes.
    pub const fn new(number: u64) -> Self {
        Self(number)
    }

    /// The change's number; 0 for [`Ticket::NONE`].
    pub const fn get(self) -> u64 {
        self.0
    }

    /// Whether there is nothing to wait for.
    pub const fn is_none(self) -> bool {
        self.0 == 0
    }

    /// Makes this ticket cover `other` too: what waits for it then waits for both.
    pub fn merge(&mut self, other: Self) {
        *self = (*self).max(other);
    }
}

/// How far changes are durable.
///
/// A storage that fails (a write or an fsync returned an error, the disk is full) sets
/// `failed` and counts a failure in `failures`; changes recorded from then on, and those not
/// durable yet, are lost. A storage that recovers by itself (the disk has room again) clears
/// `failed` and says which changes the failure lost: those numbered after `lost_after` and up
/// to `lost_upto`. Changes recorded after that are made durable as before. Whatever waited for
/// a lost change must never go out: its connection closes instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Watermark {
    /// Every change numbered up to this is durable, apart from those the latest failure lost:
    /// the highest [`Ticket::get`] made durable.
    pub durable: u64,
    /// The storage is failing now: changes after `durable` will not be made durable (until it
    /// recovers, and then only those recorded after `lost_upto`).
    pub failed: bool,
    /// How many times the storage failed so far: one who waited through a failure without
    /// seeing it (the watermark only shows the latest state) can tell.
    pub failures: u64,
    /// The latest failure lost the changes numbered after this (with the previous one's, if
    /// nothing was made durable in between) ...
    pub lost_after: u64,
    /// ... and up to this (`u64::MAX` while it lasts).
    pub lost_upto: u64,
}

impl Watermark {
    /// Changes up to `durable` are durable; `failed`: the storage failed (and lost every
    /// change after `durable`).
    pub const fn new(durable: u64, failed: bool) -> Self {
        Self {
            durable,
            failed,
            failures: failed as u64,
            lost_after: if failed { durable } else { 0 },
            lost_upto: if failed { u64::MAX } else { 0 },
        }
    }

    /// Whether the change `ticket` stands for is durable.
    pub fn covers(&self, ticket: Ticket) -> bool {
        ticket.0 <= self.durable && !self.lost(ticket)
    }

    /// Whether the latest failure lost the change `ticket` stands for: it never will be
    /// durable.
    pub fn lost(&self, ticket: Ticket) -> bool {
        ticket.0 > self.lost_after && ticket.0 <= self.lost_upto
    }

    /// Marks the storage failed, keeping what is durable: counts the failure, unless the
    /// storage is failing already. Returns whether it was news.
    pub fn fail(&mut self) -> bool {
        if self.failed {
            return false;
        }
        // Nothing was made durable since the previous failure's lost changes: they and this
        // failure's are one range, so that none of them looks durable.
        let merge = self.failures > 0 && self.durable <= self.lost_upto;
        self.failed = true;
        self.failures += 1;
        if !merge {
            self.lost_after = self.durable;
        }
        self.lost_upto = u64::MAX;
        true
    }

    /// The storage works again: every change numbered up to `last` (the last one recorded
    /// before it recovered) that was not durable is lost.
    pub fn recover(&mut self, last: u64) {
        self.failed = false;
        self.lost_upto = last.max(self.lost_after);
    }
}

/// Durable storage for the broker's state. Calls record changes in the order they are made
/// and return each change's [`Ticket`]; none is durable until the [`Storage::watermark`]
/// covers its ticket, so an implementation batches the changes of many connections into one
/// write (group commit). Recording calls do not block on I/O.
///
/// Tickets number changes in the order they are recorded, across all threads: a later
/// change never gets a lower ticket, and the watermark covers a ticket only once every
/// change with a lower one is durable too.
pub trait Storage: Send + Sync + 'static {
    /// Reads what was stored, once, at startup.
    fn recover(&self) -> Result<Recovered, StorageError>;

    /// A retained message was set; an empty payload deletes the topic's retained message.
    fn retain(&self, message: &Arc<Message>) -> Ticket;

    /// A session was created or resumed, its subscriptions or will changed, or its
    /// connection ended.
    fn save_session(&self, record: &SessionRecord) -> Ticket;

    /// A session ended, or no longer needs a record: forget its record.
    fn remove_session(&self, client_id: &ClientId) -> Ticket;

    /// A session ended: forget its messages and QoS 2 state.
    fn remove_messages(&self, client_id: &ClientId) -> Ticket;

    /// A QoS 1 or 2 message was routed to a stored session, under its
    /// [`Delivery::store_seq`] (without one, nothing is recorded: [`Ticket::NONE`]).
    fn store_delivery(&self, client_id: &ClientId, delivery: &Delivery) -> Ticket;

    /// A stored QoS 2 message's flow moved on: sent under `packet_id`, or released.
    fn delivery_flow(
        &self,
        client_id: &ClientId,
        store_seq: u64,
        packet_id: PacketId,
        state: OutboundState,
    ) -> Ticket;

    /// A stored message's flow finished, or the message was dropped (without a
    /// [`Delivery::store_seq`], nothing is recorded: [`Ticket::NONE`]).
    fn delivery_done(&self, client_id: &ClientId, delivery: &Delivery) -> Ticket;

    /// An incoming QoS 2 identifier now awaits PUBREL (`pending`), or was released.
    fn pending_release(&self, client_id: &ClientId, packet_id: PacketId, pending: bool) -> Ticket;

    /// A PUBLISH to the session is about to be sent: the change it must wait for, and until
    /// when it may be written on its strength. In a cluster, a recent confirmation that this
    /// node still owns the session, so that a node that was paused or cut off while another
    /// node took the session over sends nothing more on the old connection. Nothing by
    /// default.
    fn delivery_fence(&self, _client_id: &ClientId) -> Fence {
        Fence::default()
    }

    /// A QoS 1 or 2 publication, for stored sessions that the broker does not hold itself
    /// (in a cluster: the persistent sessions of every node, found when it is applied);
    /// `counter` makes its identity unique. Nothing by default: the broker's own routing
    /// stores its copies through [`Storage::store_delivery`].
    fn publish(&self, _message: &Message, _from: Option<&ClientId>, _counter: u64) -> Ticket {
        Ticket::NONE
    }

    /// Opens an atomic batch, if this storage has them: see [`Batch`], which the broker
    /// uses instead. Without them (the default), a [`Batch`] records each change on its own.
    fn open_batch(&self) -> Option<Box<dyn StorageBatch + '_>> {
        None
    }

    /// Follows how far changes are durable.
    fn watermark(&self) -> watch::Receiver<Watermark>;

    /// Whether connections must wait for the watermark; false when nothing is kept or
    /// acknowledgements do not wait (`durability = "none"`).
    fn is_durable(&self) -> bool {
        true
    }

    /// Makes everything recorded durable and stops; called once at shutdown.
    fn close(&self) {}
}

impl dyn Storage {
    /// Opens a batch: what is recorded through it is written in one atomic write when it is
    /// committed (see [`Batch`]).
    pub fn batch(&self) -> Batch<'_> {
        Batch::new(self)
    }
}

/// A storage's own atomic batch, as [`Storage::open_batch`] returns it; the broker records
/// through the [`Batch`] guard around it. The batch takes its ticket when it is opened,
/// before anything recorded in it can be seen, and the watermark stays below that ticket
/// until the batch is committed or dropped. Dropping a batch without committing it discards
/// what it holds: nothing of it is written, and its ticket no longer holds the watermark
/// back.
pub trait StorageBatch {
    /// As [`Storage::retain`].
    fn retain(&mut self, message: &Arc<Message>);
    /// As [`Storage::save_session`].
    fn save_session(&mut self, record: &SessionRecord);
    /// As [`Storage::remove_session`].
    fn remove_session(&mut self, client_id: &ClientId);
    /// As [`Storage::remove_messages`].
    fn remove_messages(&mut self, client_id: &ClientId);
    /// As [`Storage::store_delivery`].
    fn store_delivery(&mut self, client_id: &ClientId, delivery: &Delivery);
    /// As [`Storage::delivery_flow`].
    fn delivery_flow(
        &mut self,
        client_id: &ClientId,
        store_seq: u64,
        packet_id: PacketId,
        state: OutboundState,
    );
    /// As [`Storage::delivery_done`].
    fn delivery_done(&mut self, client_id: &ClientId, delivery: &Delivery);
    /// As [`Storage::pending_release`].
    fn pending_release(&mut self, client_id: &ClientId, packet_id: PacketId, pending: bool);
    /// As [`Storage::publish`] (nothing by default).
    fn publish(&mut self, _message: &Message, _from: Option<&ClientId>, _counter: u64) {}
    /// The ticket that covers everything recorded in the batch, taken when it was opened.
    fn ticket(&self) -> Ticket;
    /// Writes everything recorded in one atomic write: after a crash, all of it is there or
    /// none. Returns the batch's ticket, or [`Ticket::NONE`] if it held nothing.
    fn commit(self: Box<Self>) -> Ticket;
}

/// Changes recorded together, as a guard: open one with `storage.batch()` (on a `dyn Storage`),
/// pass it to whatever records, and [`Batch::commit`] it. The broker brackets the handling of
/// one QoS 1 or 2 publication with a batch, so that the copies routed to every persistent
/// session and the publisher's QoS 2 state stand or fall together.
///
/// - An atomic batch ([`Batch::new`], on a storage with [`Storage::open_batch`]) writes
///   nothing until it is committed, then everything in one write. Dropped without a commit,
///   it discards what it holds.
/// - A direct batch ([`Batch::direct`], or [`Batch::new`] on a storage without batches)
///   records each change at once; it only collects their tickets.
///
/// Every recording call returns the ticket that covers its change (for an atomic batch, the
/// batch's), and [`Batch::commit`] the one that covers all of them: the caller hands it to
/// the output that must wait. A batch is neither `Send` nor `Sync`: every task the broker
/// spawns must be `Send`, so a task that held a batch across an `.await` would not compile.
/// That is the rule "no await between recording a change and handing over its ticket" kept
/// by the compiler: a batch stays open only while one thread runs straight through.
///
/// ```compile_fail
/// # use mqttd_broker::Storage;
/// async fn publish(storage: &'static dyn Storage) {
///     let batch = storage.batch();
///     tokio::task::yield_now().await; // a batch held across an await ...
///     let _ = batch.commit();
/// }
/// fn serve(storage: &'static dyn Storage) {
///     tokio::spawn(publish(storage)); // ... is refused here: the future is not `Send`
/// }
/// ```
#[must_use = "an atomic batch writes nothing until it is committed"]
pub struct Batch<'a> {
    storage: &'a dyn Storage,
    /// The storage's atomic batch; `None`: changes are recorded one by one.
    atomic: Option<Box<dyn StorageBatch + 'a>>,
    /// Without an atomic batch, the ticket that covers every change recorded so far.
    ticket: Ticket,
    /// Keeps the batch on the thread that opened it (see above).
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("atomic", &self.atomic.is_some())
            .field("ticket", &self.ticket())
            .finish_non_exhaustive()
    }
}

impl<'a> Batch<'a> {
    /// An atomic batch, if `storage` has them; otherwise a direct one.
    pub fn new(storage: &'a dyn Storage) -> Self {
        Self {
            storage,
            atomic: storage.open_batch(),
            ticket: Ticket::NONE,
            _not_send: PhantomData,
        }
    }

    /// A batch that records each change at once and collects their tickets: for changes
    /// that need not stand or fall together, recorded by code that may also run in an
    /// atomic batch.
    pub fn direct(storage: &'a dyn Storage) -> Self {
        Self {
            storage,
            atomic: None,
            ticket: Ticket::NONE,
            _not_send: PhantomData,
        }
    }

    /// Records one change: into the atomic batch, or straight into the storage.
    fn record(
        &mut self,
        direct: impl FnOnce(&dyn Storage) -> Ticket,
        batched: impl FnOnce(&mut dyn StorageBatch),
    ) -> Ticket {
        match &mut self.atomic {
            Some(batch) => {
                batched(batch.as_mut());
                batch.ticket()
            }
            None => {
                let ticket = direct(self.storage);
                self.ticket.merge(ticket);
                ticket
            }
        }
    }

    /// See [`Storage::retain`].
    pub fn retain(&mut self, message: &Arc<Message>) -> Ticket {
        self.record(|s| s.retain(message), |b| b.retain(message))
    }

    /// See [`Storage::save_session`].
    pub fn save_session(&mut self, record: &SessionRecord) -> Ticket {
        self.record(|s| s.save_session(record), |b| b.save_session(record))
    }

    /// See [`Storage::remove_session`].
    pub fn remove_session(&mut self, client_id: &ClientId) -> Ticket {
        self.record(
            |s| s.remove_session(client_id),
            |b| b.remove_session(client_id),
        )
    }

    /// See [`Storage::remove_messages`].
    pub fn remove_messages(&mut self, client_id: &ClientId) -> Ticket {
        self.record(
            |s| s.remove_messages(client_id),
            |b| b.remove_messages(client_id),
        )
    }

    /// See [`Storage::store_delivery`].
    pub fn store_delivery(&mut self, client_id: &ClientId, delivery: &Delivery) -> Ticket {
        self.record(
            |s| s.store_delivery(client_id, delivery),
            |b| b.store_delivery(client_id, delivery),
        )
    }

    /// See [`Storage::delivery_flow`].
    pub fn delivery_flow(
        &mut self,
        client_id: &ClientId,
        store_seq: u64,
        packet_id: PacketId,
        state: OutboundState,
    ) -> Ticket {
        self.record(
            |s| s.delivery_flow(client_id, store_seq, packet_id, state),
            |b| b.delivery_flow(client_id, store_seq, packet_id, state),
        )
    }

    /// See [`Storage::delivery_done`].
    pub fn delivery_done(&mut self, client_id: &ClientId, delivery: &Delivery) -> Ticket {
        self.record(
            |s| s.delivery_done(client_id, delivery),
            |b| b.delivery_done(client_id, delivery),
        )
    }

    /// See [`Storage::pending_release`].
    pub fn pending_release(
        &mut self,
        client_id: &ClientId,
        packet_id: PacketId,
        pending: bool,
    ) -> Ticket {
        self.record(
            |s| s.pending_release(client_id, packet_id, pending),
            |b| b.pending_release(client_id, packet_id, pending),
        )
    }

    /// See [`Storage::publish`].
    pub fn publish(&mut self, message: &Message, from: Option<&ClientId>, counter: u64) -> Ticket {
        self.record(
            |s| s.publish(message, from, counter),
            |b| b.publish(message, from, counter),
        )
    }

    /// The ticket that covers everything recorded so far (an atomic batch's own, whether or
    /// not it holds anything yet).
    pub fn ticket(&self) -> Ticket {
        match &self.atomic {
            Some(batch) => batch.ticket(),
            None => self.ticket,
        }
    }

    /// Writes what an atomic batch holds, in one atomic write. Returns the ticket that covers
    /// every change recorded through the batch, or [`Ticket::NONE`] if there was none.
    pub fn commit(mut self) -> Ticket {
        match self.atomic.take() {
            Some(batch) => batch.commit(),
            None => self.ticket,
        }
    }
}

/// Storage in memory only: the broker's own state is all there is.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    watermark: std::sync::OnceLock<watch::Sender<Watermark>>,
}

impl Storage for MemoryStorage {
    fn recover(&self) -> Result<Recovered, StorageError> {
        Ok(Recovered::default())
    }

    fn retain(&self, _message: &Arc<Message>) -> Ticket {
        Ticket::NONE
    }

    fn save_session(&self, _record: &SessionRecord) -> Ticket {
        Ticket::NONE
    }

    fn remove_session(&self, _client_id: &ClientId) -> Ticket {
        Ticket::NONE
    }

    fn remove_messages(&self, _client_id: &ClientId) -> Ticket {
        Ticket::NONE
    }

    fn store_delivery(&self, _client_id: &ClientId, _delivery: &Delivery) -> Ticket {
        Ticket::NONE
    }

    fn delivery_flow(&self, _: &ClientId, _: u64, _: PacketId, _: OutboundState) -> Ticket {
        Ticket::NONE
    }

    fn delivery_done(&self, _client_id: &ClientId, _delivery: &Delivery) -> Ticket {
        Ticket::NONE
    }

    fn pending_release(&self, _: &ClientId, _: PacketId, _: bool) -> Ticket {
        Ticket::NONE
    }

    fn watermark(&self) -> watch::Receiver<Watermark> {
        self.watermark
            .get_or_init(|| watch::Sender::new(Watermark::default()))
            .subscribe()
    }

    fn is_durable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A storage without batches that numbers its changes.
    #[derive(Default)]
    struct Numbered {
        written: AtomicU64,
        watermark: watch::Sender<Watermark>,
    }

    impl Numbered {
        fn next(&self) -> Ticket {
            Ticket::new(self.written.fetch_add(1, Ordering::AcqRel) + 1)
        }
    }

    impl Storage for Numbered {
        fn recover(&self) -> Result<Recovered, StorageError> {
            Ok(Recovered::default())
        }
        fn retain(&self, _: &Arc<Message>) -> Ticket {
            self.next()
        }
        fn save_session(&self, _: &SessionRecord) -> Ticket {
            self.next()
        }
        fn remove_session(&self, _: &ClientId) -> Ticket {
            self.next()
        }
        fn remove_messages(&self, _: &ClientId) -> Ticket {
            self.next()
        }
        fn store_delivery(&self, _: &ClientId, _: &Delivery) -> Ticket {
            self.next()
        }
        fn delivery_flow(&self, _: &ClientId, _: u64, _: PacketId, _: OutboundState) -> Ticket {
            self.next()
        }
        fn delivery_done(&self, _: &ClientId, _: &Delivery) -> Ticket {
            self.next()
        }
        fn pending_release(&self, _: &ClientId, _: PacketId, _: bool) -> Ticket {
            self.next()
        }
        fn watermark(&self) -> watch::Receiver<Watermark> {
            self.watermark.subscribe()
        }
    }

    fn client() -> ClientId {
        ClientId::try_from("c").unwrap_or_default()
    }

    #[test]
    fn tickets_order_and_merge() {
        assert!(Ticket::NONE.is_none());
        assert!(Ticket::NONE < Ticket::new(1));
        let mut t = Ticket::NONE;
        t.merge(Ticket::new(3));
        t.merge(Ticket::new(2));
        assert_eq!(t, Ticket::new(3));
        let w = Watermark::new(2, false);
        assert!(w.covers(Ticket::NONE) && w.covers(Ticket::new(2)));
        assert!(!w.covers(Ticket::new(3)));
        // A failure loses what was not durable; after it, changes are made durable again.
        let mut w = Watermark::new(2, false);
        assert!(w.fail() && !w.fail());
        assert_eq!(w.failures, 1);
        assert!(w.lost(Ticket::new(3)) && w.lost(Ticket::new(u64::MAX)));
        w.recover(5);
        assert!(!w.failed && w.lost(Ticket::new(5)) && !w.lost(Ticket::new(6)));
        // Failing again before anything new was durable: both failures' changes are lost.
        let mut again = w;
        again.durable = 5;
        assert!(again.fail() && again.lost(Ticket::new(3)) && again.failures == 2);
        w.durable = 9;
        assert!(w.covers(Ticket::new(2)) && w.covers(Ticket::NONE));
        assert!(!w.covers(Ticket::new(4)) && w.covers(Ticket::new(6)));
    }

    /// Without batches in the storage, a batch records each change at once, and its commit
    /// returns the ticket that covers all of them.
    #[test]
    fn a_batch_without_storage_batches_records_at_once_and_covers_all() {
        let storage = Numbered::default();
        let pid = PacketId::MIN;
        let mut batch = Batch::new(&storage);
        assert_eq!(batch.ticket(), Ticket::NONE);
        let first = batch.pending_release(&client(), pid, true);
        let second = batch.remove_session(&client());
        assert_eq!((first, second), (Ticket::new(1), Ticket::new(2)));
        assert_eq!(
            storage.written.load(Ordering::Acquire),
            2,
            "written at once"
        );
        assert_eq!(batch.commit(), Ticket::new(2));
        assert_eq!(Batch::direct(&storage).commit(), Ticket::NONE);
        // Memory storage keeps nothing: nothing to wait for.
        let memory = MemoryStorage::default();
        let mut batch = Batch::new(&memory);
        assert_eq!(batch.remove_messages(&client()), Ticket::NONE);
        assert_eq!(batch.commit(), Ticket::NONE);
    }
}
