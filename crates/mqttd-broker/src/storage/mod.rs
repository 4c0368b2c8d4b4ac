//! Where the broker's durable state goes.
//!
//! The broker keeps its working state in memory and tells a [`Storage`] about every change that
//! must survive a crash: persistent sessions and their subscriptions and wills, every QoS 1
//! and 2 message routed to one of them and where its flow stands, incoming QoS 2 identifiers
//! awaiting PUBREL, and retained messages. Each change is numbered ([`Storage::written`]);
//! the storage makes changes durable in groups and publishes how far it got
//! ([`Storage::watermark`]). A connection holds back any packet that depends on a change
//! (PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, CONNACK, a PUBLISH of a stored message) until
//! the watermark passes it: persist, then acknowledge, without blocking the connection's
//! reading meanwhile.
//!
//! [`MemoryStorage`] keeps nothing beyond the broker's own memory; [`DiskStorage`] keeps an
//! embedded store in the data directory.

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

/// How far changes are durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Watermark {
    /// Every change numbered up to this is durable.
    pub durable: u64,
    /// The storage failed: changes after `durable` never will be.
    pub failed: bool,
}

/// Durable storage for the broker's state. Calls record changes in the order they are made;
/// none is durable until the [`Storage::watermark`] passes its number, so an implementation
/// batches the changes of many connections into one write (group commit). Recording calls do
/// not block on I/O.
pub trait Storage: Send + Sync + 'static {
    /// Reads what was stored, once, at startup.
    fn recover(&self) -> Result<Recovered, StorageError>;

    /// A retained message was set; an empty payload deletes the topic's retained message.
    fn retain(&self, message: &Arc<Message>);

    /// A session was created or resumed, its subscriptions or will changed, or its
    /// connection ended.
    fn save_session(&self, record: &SessionRecord);

    /// A session ended, or no longer needs a record: forget its record.
    fn remove_session(&self, client_id: &ClientId);

    /// A session ended: forget its messages and QoS 2 state.
    fn remove_messages(&self, client_id: &ClientId);

    /// A QoS 1 or 2 message was routed to a stored session, under its
    /// [`Delivery::store_seq`].
    fn store_delivery(&self, client_id: &ClientId, delivery: &Delivery);

    /// A stored QoS 2 message's flow moved on: sent under `packet_id`, or released.
    fn delivery_flow(
        &self,
        client_id: &ClientId,
        store_seq: u64,
        packet_id: PacketId,
        state: OutboundState,
    );

    /// A stored message's flow finished, or the message was dropped.
    fn delivery_done(&self, client_id: &ClientId, delivery: &Delivery);

    /// An incoming QoS 2 identifier now awaits PUBREL (`pending`), or was released.
    fn pending_release(&self, client_id: &ClientId, packet_id: PacketId, pending: bool);

    /// Groups what this thread records until [`Storage::commit_batch`] into one atomic
    /// write: after a crash, all of it is there or none. The broker brackets the handling of
    /// one QoS 1 or 2 publication with it (no await in between), so that the copies routed to
    /// every persistent session and the publisher's QoS 2 state stand or fall together.
    /// Batches nest; only the outermost one writes.
    fn begin_batch(&self) {}

    /// Writes the batch [`Storage::begin_batch`] opened; returns whether it held anything.
    fn commit_batch(&self) -> bool {
        false
    }

    /// The number of the latest change recorded.
    fn written(&self) -> u64;

    /// The number of the change this thread recorded last (or of its open batch): what
    /// output that depends on it waits for. Never more than [`Storage::written`].
    fn ticket(&self) -> u64 {
        self.written()
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

/// Storage in memory only: the broker's own state is all there is.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    watermark: std::sync::OnceLock<watch::Sender<Watermark>>,
}

impl Storage for MemoryStorage {
    fn recover(&self) -> Result<Recovered, StorageError> {
        Ok(Recovered::default())
    }

    fn retain(&self, _message: &Arc<Message>) {}

    fn save_session(&self, _record: &SessionRecord) {}

    fn remove_session(&self, _client_id: &ClientId) {}

    fn remove_messages(&self, _client_id: &ClientId) {}

    fn store_delivery(&self, _client_id: &ClientId, _delivery: &Delivery) {}

    fn delivery_flow(&self, _: &ClientId, _: u64, _: PacketId, _: OutboundState) {}

    fn delivery_done(&self, _client_id: &ClientId, _delivery: &Delivery) {}

    fn pending_release(&self, _: &ClientId, _: PacketId, _: bool) {}

    fn written(&self) -> u64 {
        0
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
