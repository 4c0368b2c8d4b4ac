//! Where the broker's durable state goes.
//!
//! The broker keeps its working state in memory and tells a [`Storage`] about every change that
//! must survive a restart; [`Storage::sync`] resolves once those changes are durable, and the
//! broker waits for it before acknowledging a message whose delivery depended on them
//! ("persist, then acknowledge"). [`MemoryStorage`] is the default: it keeps nothing beyond the
//! broker's own memory, so a restart starts empty and `sync` is immediate.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;

use mqttd_proto::{ClientId, Message, SubscriptionOptions, TopicFilter};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The storage could not be read or written.
    #[error("storage I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Stored data is damaged.
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
}

/// What a persistent session looks like on disk, apart from its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Client identifier.
    pub client_id: ClientId,
    /// Session expiry interval in seconds.
    pub expiry_interval: u32,
    /// Subscriptions with their options and identifiers.
    pub subscriptions: Vec<(TopicFilter, SubscriptionOptions, Option<NonZeroU32>)>,
}

/// State found at startup.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Retained messages.
    pub retained: Vec<Arc<Message>>,
    /// Persistent sessions.
    pub sessions: Vec<SessionRecord>,
}

/// A future that resolves once earlier changes are durable.
pub type SyncFuture = Pin<Box<dyn Future<Output = Result<(), StorageError>> + Send>>;

/// Durable storage for the broker's state. Calls record changes; none is durable until a
/// later [`Storage::sync`] resolves, so an implementation can batch the changes of many
/// connections into one write (group commit).
pub trait Storage: Send + Sync + 'static {
    /// Reads what was stored, once, at startup.
    fn recover(&self) -> Result<Recovered, StorageError>;

    /// A retained message was set; an empty payload deletes the topic's retained message.
    fn retain(&self, message: &Arc<Message>);

    /// A persistent session was created or resumed, or its subscriptions changed.
    fn save_session(&self, record: &SessionRecord);

    /// A session ended: forget it.
    fn remove_session(&self, client_id: &ClientId);

    /// Resolves once every change recorded before the call is durable.
    fn sync(&self) -> SyncFuture;

    /// Whether [`Storage::sync`] can ever wait; lets the broker skip it on the hot path.
    fn is_durable(&self) -> bool {
        true
    }
}

/// Storage in memory only: the broker's own state is all there is.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryStorage;

impl Storage for MemoryStorage {
    fn recover(&self) -> Result<Recovered, StorageError> {
        Ok(Recovered::default())
    }

    fn retain(&self, _message: &Arc<Message>) {}

    fn save_session(&self, _record: &SessionRecord) {}

    fn remove_session(&self, _client_id: &ClientId) {}

    fn sync(&self) -> SyncFuture {
        Box::pin(std::future::ready(Ok(())))
    }

    fn is_durable(&self) -> bool {
        false
    }
}
