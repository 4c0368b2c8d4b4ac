//! The Raft log and the state machine, stored in fjall.
//!
//! One fjall database in its own directory (by default `cluster/` beside the broker's store)
//! with two keyspaces:
//! - `log`: the Raft log, key = index (u64 big-endian, so that keys sort as indexes),
//!   value = the entry (JSON);
//! - `meta`: `vote`, `committed`, `last_purged` (JSON), the latest snapshot as
//!   `snapshot_meta` (JSON) and `snapshot_data` (the state's bytes), written in one batch, and
//!   the node's `incarnation`, bumped at every open.
//!
//! The state machine itself lives in memory. It is rebuilt on open from the latest snapshot,
//! and openraft applies the committed entries after it again (it reads `committed` back for
//! that), so a restarted node has its state before it hears from any peer. Appends and votes
//! are synced to disk before openraft is told they are done: Raft's promises rest on them.

// openraft's traits return its StorageError (224 bytes); our helpers return what they return.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::state::{ClusterState, Effect, NodeId, Outcome};
use crate::{Member, TypeConfig};

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";
const INCARNATION: &str = "incarnation";

/// An error opening the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// fjall could not open the database or a keyspace.
    #[error("cannot open the cluster store in {path}: {source}")]
    Engine {
        /// The store's directory.
        path: PathBuf,
        /// fjall's error.
        source: fjall::Error,
    },
    /// The incarnation cannot be read or written.
    #[error("cannot bump the node's incarnation in {path}: {reason}")]
    Incarnation {
        /// The store's directory.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The stored snapshot cannot be read.
    #[error("the cluster store in {path} holds a snapshot that cannot be read: {reason}")]
    Snapshot {
        /// The store's directory.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

type StoreResult<T> = Result<T, StorageError<NodeId>>;

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write(&e).into()
}

/// The fjall database shared by the log store and the state machine.
struct Disk {
    db: Database,
    log: Keyspace,
    meta: Keyspace,
}

impl Disk {
    fn get<T: DeserializeOwned>(&self, key: &str) -> StoreResult<Option<T>> {
        match self.meta.get(key).map_err(read_err)? {
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(read_err),
            None => Ok(None),
        }
    }

    fn put<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        mode: Option<PersistMode>,
    ) -> StoreResult<()> {
        let bytes = serde_json::to_vec(value).map_err(write_err)?;
        self.meta.insert(key, bytes).map_err(write_err)?;
        if let Some(mode) = mode {
            self.db.persist(mode).map_err(write_err)?;
        }
        Ok(())
    }
}

/// Opens (or creates) the cluster store in `dir`: the log store and the state machine that
/// openraft drives.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachine), OpenError> {
    let engine = |source| OpenError::Engine {
        path: dir.to_owned(),
        source,
    };
    let db = Database::builder(dir).open().map_err(engine)?;
    let log = db
        .keyspace("log", KeyspaceCreateOptions::default)
        .map_err(engine)?;
    let meta = db
        .keyspace("meta", KeyspaceCreateOptions::default)
        .map_err(engine)?;
    let disk = Arc::new(Disk { db, log, meta });
    let incarnation = disk
        .get::<u64>(INCARNATION)
        .and_then(|last| {
            let next = last.unwrap_or(0).saturating_add(1);
            disk.put(INCARNATION, &next, Some(PersistMode::SyncAll))?;
            Ok(next)
        })
        .map_err(|e| OpenError::Incarnation {
            path: dir.to_owned(),
            reason: e.to_string(),
        })?;
    let snapshot_err = |reason: String| OpenError::Snapshot {
        path: dir.to_owned(),
        reason,
    };
    let mut applied = Applied::default();
    match (
        disk.get::<SnapshotMeta<NodeId, Member>>(SNAPSHOT_META),
        disk.meta.get(SNAPSHOT_DATA),
    ) {
        (Ok(Some(meta)), Ok(Some(data))) => {
            applied.state =
                ClusterState::from_bytes(&data).map_err(|e| snapshot_err(e.to_string()))?;
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership;
        }
        (Ok(None), _) | (_, Ok(None)) => {}
        (Err(e), _) => return Err(snapshot_err(e.to_string())),
        (_, Err(e)) => return Err(snapshot_err(e.to_string())),
    }
    let log_store = LogStore {
        disk: disk.clone(),
        incarnation,
    };
    let sm = StateMachine {
        disk,
        applied: Arc::new(RwLock::new(applied)),
        hook: HookSlot::default(),
    };
    Ok((log_store, sm))
}

/// The Raft log and vote in fjall. Clones share the database.
#[derive(Clone)]
pub struct LogStore {
    disk: Arc<Disk>,
    incarnation: u64,
}

impl LogStore {
    /// This life of the node: one more than at the previous open of the store (1 at the
    /// first), synced before the store is used.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    fn last_purged(&self) -> StoreResult<Option<LogId<NodeId>>> {
        self.disk.get::<LogId<NodeId>>(LAST_PURGED)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + Send>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => Bound::Included(i.to_be_bytes()),
            Bound::Excluded(i) => Bound::Excluded(i.to_be_bytes()),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(i.to_be_bytes()),
            Bound::Excluded(i) => Bound::Excluded(i.to_be_bytes()),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut entries = Vec::new();
        for guard in self.disk.log.range::<[u8; 8], _>((start, end)) {
            let value = guard.value().map_err(read_err)?;
            entries.push(serde_json::from_slice(&value).map_err(read_err)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let last_purged_log_id = self.last_purged()?;
        let last = match self.disk.log.last_key_value() {
            Some(guard) => {
                let value = guard.value().map_err(read_err)?;
                let entry: Entry<TypeConfig> = serde_json::from_slice(&value).map_err(read_err)?;
                Some(entry.log_id)
            }
            None => None,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StoreResult<()> {
        self.disk.put(VOTE, vote, Some(PersistMode::SyncAll))
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<NodeId>>> {
        self.disk.get(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StoreResult<()> {
        // Not synced: a committed index lost in a crash is learned again from the leader; it
        // only lets a restarted node apply its log before it hears from one.
        self.disk.put(COMMITTED, &committed, None)
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<NodeId>>> {
        Ok(self.disk.get::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = self.disk.db.batch();
        for entry in entries {
            let value = serde_json::to_vec(&entry).map_err(write_err)?;
            batch.insert(&self.disk.log, entry.log_id.index.to_be_bytes(), value);
        }
        let synced = batch
            .commit()
            .and_then(|()| self.disk.db.persist(PersistMode::SyncAll));
        match synced {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        // Removes the entries from log_id on: they conflict with the leader's.
        let mut batch = self.disk.db.batch();
        for guard in self.disk.log.range(log_id.index.to_be_bytes()..) {
            batch.remove(&self.disk.log, guard.key().map_err(read_err)?);
        }
        batch
            .commit()
            .and_then(|()| self.disk.db.persist(PersistMode::SyncAll))
            .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StoreResult<()> {
        // The purge mark first: a crash in between leaves entries below it, which are ignored.
        self.disk
            .put(LAST_PURGED, &log_id, Some(PersistMode::SyncAll))?;
        let mut batch = self.disk.db.batch();
        for guard in self.disk.log.range(..=log_id.index.to_be_bytes()) {
            batch.remove(&self.disk.log, guard.key().map_err(read_err)?);
        }
        batch.commit().map_err(write_err)
    }
}

/// What the state machine has applied.
#[derive(Debug, Default)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Member>,
    state: ClusterState,
}

#[derive(Debug, Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    data: Vec<u8>,
}

/// Told, on each node, what the entries it applies change for the sessions (see
/// [`Effect`]): the owner of a session delivers what was queued for it, a node that lost a
/// session disconnects its client. Raft's apply task calls it after the state is updated and
/// its lock released, in log order; it must not block. Entries applied again at a restart
/// (those after the latest snapshot) are told again.
pub trait ApplyHook: Send + Sync + 'static {
    /// What one or more applied entries changed, in order.
    fn applied(&self, effects: Vec<Effect>);

    /// A snapshot from the leader replaced the state: the changes it covers were not told
    /// one by one.
    fn replaced(&self) {}
}

/// Where the hook is, once the broker has set it.
type HookSlot = Arc<RwLock<Option<Arc<dyn ApplyHook>>>>;

/// A read handle on the applied cluster state.
#[derive(Clone)]
pub struct StateReader {
    applied: Arc<RwLock<Applied>>,
    hook: HookSlot,
}

impl std::fmt::Debug for StateReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateReader").finish_non_exhaustive()
    }
}

impl StateReader {
    /// Reads the state as applied on this node so far.
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.lock().state)
    }

    /// The index of the last entry applied on this node.
    pub fn last_applied_index(&self) -> Option<u64> {
        self.lock().last_applied.map(|l| l.index)
    }

    /// Sets the hook told what applied entries change, replacing any before it.
    pub(crate) fn set_hook(&self, hook: Arc<dyn ApplyHook>) {
        *self.hook.write().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    fn lock(&self) -> RwLockReadGuard<'_, Applied> {
        // A panic while applying would have stopped Raft already; the data is still whole.
        self.applied.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// The state machine that openraft drives: the [`ClusterState`] and its snapshots.
pub struct StateMachine {
    disk: Arc<Disk>,
    applied: Arc<RwLock<Applied>>,
    hook: HookSlot,
}

impl StateMachine {
    /// A read handle on the applied state.
    pub fn reader(&self) -> StateReader {
        StateReader {
            applied: self.applied.clone(),
            hook: self.hook.clone(),
        }
    }

    fn hook(&self) -> Option<Arc<dyn ApplyHook>> {
        self.hook.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.applied.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a snapshot: the current one from now on.
    fn save_snapshot(&self, snapshot: &StoredSnapshot) -> StoreResult<()> {
        let meta = serde_json::to_vec(&snapshot.meta).map_err(write_err)?;
        let mut batch = self.disk.db.batch();
        batch.insert(&self.disk.meta, SNAPSHOT_META, meta);
        batch.insert(&self.disk.meta, SNAPSHOT_DATA, snapshot.data.as_slice());
        batch
            .commit()
            .and_then(|()| self.disk.db.persist(PersistMode::SyncAll))
            .map_err(|e| {
                StorageError::from(StorageIOError::write_snapshot(
                    Some(snapshot.meta.signature()),
                    &e,
                ))
            })?;
        Ok(())
    }

    fn build(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let (data, last_log_id, last_membership) = {
            let applied = self.applied.read().unwrap_or_else(|e| e.into_inner());
            let data = applied.state.to_bytes().map_err(read_err)?;
            (data, applied.last_applied, applied.membership.clone())
        };
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}", l.leader_id, l.index),
            None => "empty".to_owned(),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        self.save_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        })?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// Builds snapshots for openraft: a copy of the state machine's handles.
pub struct SnapshotBuilder {
    sm: StateMachine,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        self.sm.build()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StoreResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>)> {
        let applied = self.applied.read().unwrap_or_else(|e| e.into_inner());
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<Outcome>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut effects = Vec::new();
        let mut outcomes = Vec::new();
        {
            let mut applied = self.write();
            for entry in entries {
                applied.last_applied = Some(entry.log_id);
                let outcome = match entry.payload {
                    EntryPayload::Blank => Outcome::Done,
                    EntryPayload::Normal(command) => {
                        applied.state.apply_with(command, &mut effects)
                    }
                    EntryPayload::Membership(m) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), m);
                        Outcome::Done
                    }
                };
                outcomes.push(outcome);
            }
        }
        if !effects.is_empty() {
            if let Some(hook) = self.hook() {
                hook.applied(effects);
            }
        }
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            sm: Self {
                disk: self.disk.clone(),
                applied: self.applied.clone(),
                hook: self.hook.clone(),
            },
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let data = snapshot.into_inner();
        let state = ClusterState::from_bytes(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
        })?;
        self.save_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })?;
        {
            let mut applied = self.write();
            applied.state = state;
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership.clone();
        }
        if let Some(hook) = self.hook() {
            hook.replaced();
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        // Snapshots live on disk only (a builder writes them there).
        let Some(meta) = self
            .disk
            .get::<SnapshotMeta<NodeId, Member>>(SNAPSHOT_META)?
        else {
            return Ok(None);
        };
        let Some(data) = self.disk.meta.get(SNAPSHOT_DATA).map_err(read_err)? else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data.to_vec())),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use openraft::{CommittedLeaderId, Membership};

    use super::*;
    use crate::state::Command;

    fn log_id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn entry(term: u64, index: u64, command: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Normal(command),
        }
    }

    fn claim(id: &str) -> Command {
        Command::ClaimSession {
            owner_quiet_ms: 0,
            not_after_ms: 0,
            incarnation: 0,
            client_id: id.into(),
            node: 1,
            expires_at_ms: None,
            clean: false,
        }
    }

    /// Appends without openraft: writes the entries as `append` does.
    fn append(store: &LogStore, entries: &[Entry<TypeConfig>]) {
        let mut batch = store.disk.db.batch();
        for e in entries {
            batch.insert(
                &store.disk.log,
                e.log_id.index.to_be_bytes(),
                serde_json::to_vec(e).unwrap(),
            );
        }
        batch.commit().unwrap();
        store.disk.db.persist(PersistMode::SyncAll).unwrap();
    }

    #[tokio::test]
    async fn log_vote_committed_and_snapshot_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let members = BTreeMap::from([(
            1,
            Member {
                name: "a".into(),
                addr: "127.0.0.1:1".into(),
            },
        )]);
        {
            let (mut log, mut sm) = open(dir.path()).unwrap();
            assert_eq!(log.incarnation(), 1);
            append(
                &log,
                &[
                    entry(1, 1, claim("c1")),
                    entry(1, 2, claim("c2")),
                    entry(1, 3, claim("c3")),
                ],
            );
            log.save_vote(&Vote::new(3, 1)).await.unwrap();
            log.save_committed(Some(log_id(1, 3))).await.unwrap();
            let membership = Entry {
                log_id: log_id(1, 4),
                payload: EntryPayload::Membership(Membership::new(vec![[1].into()], members)),
            };
            let outcomes = sm
                .apply(vec![
                    entry(1, 1, claim("c1")),
                    entry(1, 2, claim("c1")),
                    membership,
                ])
                .await
                .unwrap();
            assert!(matches!(outcomes[1], Outcome::Claimed { epoch: 2, .. }));
            let snap = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            assert_eq!(snap.meta.last_log_id, Some(log_id(1, 4)));
            // Conflicting entries go; purged ones are remembered.
            log.truncate(log_id(1, 3)).await.unwrap();
            log.purge(log_id(1, 1)).await.unwrap();
        }
        let (mut log, mut sm) = open(dir.path()).unwrap();
        assert_eq!(log.incarnation(), 2, "one more than at the first open");
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 3)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1)));
        assert_eq!(state.last_log_id, Some(log_id(1, 2)));
        let entries = log.try_get_log_entries(0..10).await.unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].log_id, log_id(1, 2));
        // The state machine is back from the snapshot.
        let (applied, membership) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(1, 4)));
        assert_eq!(membership.log_id(), &Some(log_id(1, 4)));
        assert_eq!(
            sm.reader().read(|s| s.session("c1").map(|o| o.epoch)),
            Some(2)
        );
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id, Some(log_id(1, 4)));
    }

    #[tokio::test]
    async fn an_installed_snapshot_replaces_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, mut sm) = open(dir.path()).unwrap();
        sm.apply(vec![entry(1, 1, claim("old"))]).await.unwrap();
        let mut other = ClusterState::default();
        other.apply(claim("new"));
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(2, 9)),
            last_membership: StoredMembership::default(),
            snapshot_id: "2-9".into(),
        };
        sm.install_snapshot(&meta, Box::new(Cursor::new(other.to_bytes().unwrap())))
            .await
            .unwrap();
        assert_eq!(sm.reader().read(|s| s.clone()), other);
        assert_eq!(sm.reader().last_applied_index(), Some(9));
        drop(sm);
        drop(_log);
        let (_log, sm) = open(dir.path()).unwrap();
        assert_eq!(sm.reader().read(|s| s.clone()), other);
    }
}
