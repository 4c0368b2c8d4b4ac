//! [`DiskStorage`]: the broker's state in an embedded log-structured store (fjall) in the data
//! directory, made durable by one committer thread in groups.
//!
//! Recording a change is a write into the store's memory table and journal buffer; nothing
//! waits for the disk. The committer thread loops: it takes the number of the latest change,
//! makes the journal durable (`fdatasync` for [`Durability::Sync`], a write to the operating
//! system for [`Durability::Batch`]), and publishes that number as the watermark. Changes
//! that arrive during one sync ride on the next, so a single sync covers the changes of every
//! connection that made one meanwhile (group commit).
//!
//! Layout, one keyspace each: `sessions` (client id → record), `deliveries` (client id, 0,
//! sequence → message), `flows` (same key → QoS 2 packet identifier and state), `inbound`
//! (client id, 0, packet identifier → nothing), `retained` (topic → message), and `meta`
//! (`alive`: the last time the broker was known to run; `clean`: it shut down cleanly).
//! Client identifiers cannot contain U+0000, so `client id, 0` is a prefix no other client
//! shares.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use parking_lot::{Condvar, Mutex, RwLock};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use mqttd_proto::session::OutboundState;
use mqttd_proto::{ClientId, Delivery, Message, MqttStr, PacketId, QoS};

use super::record::{self, Clock};
use super::{
    Durability, Recovered, SessionRecord, Storage, StorageBatch, StorageError, StoredDelivery,
    StoredSession, Ticket, Watermark,
};

/// How often the committer records that the broker is alive, so that after a crash the
/// sessions that were connected count their will delay and expiry from about then.
const ALIVE_EVERY: Duration = Duration::from_secs(1);

const ALIVE: &[u8] = b"alive";
const CLEAN: &[u8] = b"clean";
/// Written beside the store at a clean shutdown: how many records of each kind it holds, so
/// that the next start can tell whether any went missing.
const MANIFEST: &str = "clean-shutdown";
/// The longest shutdown waits for the manifest.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The first wait before the store is opened again after a failure; it doubles up to
/// [`REOPEN_MAX`] while the store keeps failing.
const REOPEN_FIRST: Duration = Duration::from_millis(100);
const REOPEN_MAX: Duration = Duration::from_secs(5);

/// `mqttd_store_errors_total`, labelled by `op`.
pub(crate) type ErrorCounters = prometheus_client::metrics::family::Family<
    [(&'static str, &'static str); 1],
    prometheus_client::metrics::counter::Counter,
>;

/// What failed, as `mqttd_store_errors_total` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Recording a change (the engine's journal write).
    Write,
    /// Making changes durable (write to the operating system, fsync).
    Sync,
    /// Opening the store again after a failure.
    Open,
    /// Giving back the disk space of removed messages (see [`Shared::reclaim_loop`]).
    Reclaim,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Sync => "sync",
            Self::Open => "open",
            Self::Reclaim => "reclaim",
        }
    }
}

/// How often the reclaimer looks at what was removed (see [`Shared::reclaim_loop`]).
const RECLAIM_CHECK: Duration = Duration::from_secs(1);
/// Messages removed since the last reclaim before another is worth its cost while messages
/// keep being removed.
const RECLAIM_MIN_REMOVED: u64 = 20_000;
/// Once no message was removed for this long, any removed since the last reclaim are worth
/// one: otherwise the few left over after a reclaim that ran in the middle of a drain would
/// keep their space until the next burst of traffic.
const RECLAIM_QUIET: Duration = Duration::from_secs(3);
/// A reclaim runs once the messages removed since the last one are at least this many times
/// those still stored, so that what it rewrites (the live ones) is a small part of what it
/// frees, and its cost per removed message is bounded.
const RECLAIM_RATIO: u64 = 4;
/// The least time between two reclaims, which bounds their cost under a steady stream of
/// messages passing through.
const RECLAIM_MIN_INTERVAL: Duration = Duration::from_secs(10);
/// The longest a reclaim waits for one memory table to be flushed before it gives up.
const RECLAIM_STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// How the committer makes the journal durable and reads the time: the store and the real
/// clock, or in unit tests a stand-in that counts, holds back or fails its syncs and moves
/// time by hand, so that what the watermark may claim can be checked sync by sync.
trait SyncStep: Send + Sync + 'static {
    /// Writes the journal to the operating system, and with [`PersistMode::SyncData`] to
    /// stable storage; returns once it is there.
    fn persist(&self, db: &Database, mode: PersistMode) -> Result<(), fjall::Error>;
    /// The time the committer goes by.
    fn now(&self) -> Instant;
    /// Called before each write of a change: an error fails the write, as a full disk does.
    /// Only tests inject errors here.
    fn check_write(&self) -> Result<(), fjall::Error> {
        Ok(())
    }
}

/// The real sync step: the store's own flush, an fsync of its active journal, the system's
/// clock.
struct EngineSync {
    /// The store's directory, where the engine keeps its journals.
    path: PathBuf,
}

impl SyncStep for EngineSync {
    /// The engine's own fsync holds its journal lock throughout, so every connection
    /// recording a change meanwhile would wait milliseconds for it: the journal is written to
    /// the operating system under the lock, then made durable outside it. What was written
    /// before is in the active journal, or in an older one, which the engine synced when it
    /// sealed it.
    fn persist(&self, db: &Database, mode: PersistMode) -> Result<(), fjall::Error> {
        db.persist(PersistMode::Buffer)?;
        match mode {
            PersistMode::Buffer => Ok(()),
            PersistMode::SyncData | PersistMode::SyncAll => {
                // The engine always has an active journal: none means the store is gone.
                let journal = active_journal(&self.path).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no journal in the store")
                })?;
                let file = match std::fs::File::open(&journal) {
                    // Sealed and removed since it was listed: the engine synced it when it
                    // sealed it, and with it every older one.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                    opened => opened?,
                };
                if mode == PersistMode::SyncAll {
                    file.sync_all()?;
                } else {
                    file.sync_data()?;
                }
                Ok(())
            }
        }
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A simulated power cut, for the crash-point tests: the first `writes` writes of data reach
/// the store and nothing after them does, as if the machine lost power right there. The
/// watermark never passes a change that lost a write, so nothing that depends on one is
/// acknowledged.
#[derive(Debug)]
pub(crate) struct PowerCut {
    /// Writes that still reach the store.
    left: AtomicU64,
    /// Writes attempted: where a cut can fall.
    writes: AtomicU64,
    /// A write was lost.
    cut: AtomicBool,
    /// The lowest change number assigned after the cut; `u64::MAX` before it.
    first_lost: AtomicU64,
}

impl PowerCut {
    /// A cut after `writes` writes (`u64::MAX`: never, to count a run's writes).
    #[cfg(test)]
    pub(crate) fn after(writes: u64) -> Arc<Self> {
        Arc::new(Self {
            left: AtomicU64::new(writes),
            writes: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            first_lost: AtomicU64::new(u64::MAX),
        })
    }

    /// Whether a write was lost.
    pub(crate) fn happened(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// Writes attempted so far.
    #[cfg(test)]
    pub(crate) fn writes(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }

    /// Takes one write: whether it reaches the store.
    fn write(&self) -> bool {
        self.writes.fetch_add(1, Ordering::AcqRel);
        let kept = self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| l.checked_sub(1))
            .is_ok();
        if !kept {
            self.cut.store(true, Ordering::Release);
        }
        kept
    }

    /// A change numbered `ticket` or later is being recorded: after the cut, it counts as
    /// lost.
    fn recorded(&self, ticket: u64) {
        if self.happened() {
            self.first_lost.fetch_min(ticket, Ordering::AcqRel);
        }
    }
}

/// The broker's state on disk.
pub struct DiskStorage {
    shared: Arc<Shared>,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Gives back the space of removed messages (see `Shared::reclaim_loop`).
    reclaimer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The open store: the engine's handles. It is replaced whole when the store is opened again
/// after a failure. A clone is more handles on the same store (the reclaimer's).
#[derive(Clone)]
struct Engine {
    db: Database,
    sessions: Keyspace,
    deliveries: Keyspace,
    flows: Keyspace,
    inbound: Keyspace,
    retained: Keyspace,
    meta: Keyspace,
}

impl Engine {
    /// Opens the engine on `path` (the caller measured the journals first).
    fn open(path: &Path) -> Result<Self, StorageError> {
        // A damaged file can make the engine panic rather than fail; either way, say which
        // store it was.
        let opened = std::panic::catch_unwind(|| {
            Database::builder(path)
                .manual_journal_persist(true)
                .cache_size(4 * 1024 * 1024)
                .max_journaling_size(64 * 1024 * 1024)
                .open()
        });
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => return Err(engine(path, e)),
            Err(_) => {
                return Err(StorageError::Corrupt(format!(
                    "{}: the store is damaged and cannot be opened; move the directory aside \
                     to start empty, or restore it from a backup",
                    path.display()
                )))
            }
        };
        // Memory tables are flushed to disk at these sizes: they bound the memory the store
        // holds beyond its 4 MiB block cache.
        let ks = |name: &str, memtable: u64| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default().max_memtable_size(memtable)
            })
            .map_err(|e| engine(path, e))
        };
        const MIB: u64 = 1024 * 1024;
        Ok(Self {
            sessions: ks("sessions", 2 * MIB)?,
            deliveries: ks("deliveries", 16 * MIB)?,
            flows: ks("flows", 2 * MIB)?,
            inbound: ks("inbound", 2 * MIB)?,
            retained: ks("retained", 2 * MIB)?,
            meta: ks("meta", MIB)?,
            db,
        })
    }
}

struct Shared {
    path: PathBuf,
    /// The open store; `None` while it is being opened again after a failure (or could not
    /// be). Recording holds the read lock from its write until its ticket is taken, so that
    /// reopening (the write lock) sees every ticket of the old store.
    engine: RwLock<Option<Engine>>,
    /// Bumped each time the store is opened again: a failure of an older store's handle (a
    /// batch opened before) is no news.
    generation: AtomicU64,
    /// Inside a failure episode: logged when it begins and when it ends, not per error.
    failing: AtomicBool,
    /// Set by a failure: the committer opens the store again.
    reopen: AtomicBool,
    /// `mqttd_store_errors_total`, once the broker attached its metrics.
    errors: std::sync::OnceLock<ErrorCounters>,
    durability: Durability,
    interval: Duration,
    sync_step: Box<dyn SyncStep>,
    power_cut: Option<Arc<PowerCut>>,
    /// The number of the latest change recorded (or batch opened): the latest ticket.
    written: AtomicU64,
    /// Numbers reserved by batches still being recorded.
    open_batches: Mutex<std::collections::BTreeSet<u64>>,
    /// Bytes of complete changes the engine cut from its journals while opening: damage.
    journal_cut: u64,
    watermark: watch::Sender<Watermark>,
    /// Set when a change arrives; the committer sleeps on `wake` while it is clear.
    pending: Mutex<bool>,
    wake: Condvar,
    stop: AtomicBool,
    /// Messages stored now (approximately: counted as they are stored and removed).
    live_deliveries: AtomicU64,
    /// Messages removed since the last reclaim.
    removed_deliveries: AtomicU64,
    /// Set to stop the reclaimer, which sleeps on `reclaim_wake`.
    reclaim_stop: Mutex<bool>,
    reclaim_wake: Condvar,
    /// Held by the reclaimer while it holds handles of the store, and by [`Shared::reopen`]
    /// while it replaces the store: the engine locks its directory until its last handle is
    /// gone, and a reclaim must not start on a store being replaced.
    reclaim_gate: Mutex<()>,
    /// Reclaims completed.
    reclaims: AtomicU64,
}

impl std::fmt::Debug for DiskStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStorage")
            .field("path", &self.shared.path)
            .field("durability", &self.shared.durability)
            .finish_non_exhaustive()
    }
}

fn engine(path: &Path, e: fjall::Error) -> StorageError {
    match e {
        fjall::Error::Io(io) => StorageError::Io(std::io::Error::new(
            io.kind(),
            format!("{}: {io}", path.display()),
        )),
        other => StorageError::Corrupt(format!(
            "{}: {other} (the store cannot be opened; move the directory aside to start \
             empty, or restore it from a backup)",
            path.display()
        )),
    }
}

impl DiskStorage {
    /// Opens (or creates) the store at `path`. `interval` bounds how long
    /// [`Durability::Batch`] waits for an fsync and [`Durability::None`] for any write.
    pub fn open(
        path: impl Into<PathBuf>,
        durability: Durability,
        interval: Duration,
    ) -> Result<Self, StorageError> {
        let path = path.into();
        Self::open_with(
            path.clone(),
            durability,
            interval,
            Box::new(EngineSync { path: path.clone() }),
            None,
        )
    }

    /// Opens the store with a simulated power cut.
    #[cfg(test)]
    pub(crate) fn open_with_power_cut(
        path: PathBuf,
        durability: Durability,
        interval: Duration,
        power_cut: Arc<PowerCut>,
    ) -> Result<Self, StorageError> {
        Self::open_with(
            path.clone(),
            durability,
            interval,
            Box::new(EngineSync { path }),
            Some(power_cut),
        )
    }

    fn open_with(
        path: PathBuf,
        durability: Durability,
        interval: Duration,
        sync_step: Box<dyn SyncStep>,
        power_cut: Option<Arc<PowerCut>>,
    ) -> Result<Self, StorageError> {
        std::fs::create_dir_all(&path).map_err(|e| {
            StorageError::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", path.display()),
            ))
        })?;
        let journals_before = journal_ends(&path);
        let engine_now = Engine::open(&path)?;
        let (journal_cut, journal_tail) = journal_cuts(&journals_before);
        if journal_tail > 0 {
            info!(
                path = %path.display(),
                bytes = journal_tail,
                "the store's journal ended in a change that was still being written when the \
                 broker stopped; its {journal_tail} byte(s) were dropped"
            );
        }
        let shared = Arc::new(Shared {
            engine: RwLock::new(Some(engine_now)),
            generation: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            reopen: AtomicBool::new(false),
            errors: std::sync::OnceLock::new(),
            path,
            durability,
            interval,
            sync_step,
            power_cut,
            written: AtomicU64::new(0),
            open_batches: Mutex::default(),
            journal_cut,
            watermark: watch::Sender::new(Watermark::default()),
            pending: Mutex::new(false),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            live_deliveries: AtomicU64::new(0),
            removed_deliveries: AtomicU64::new(0),
            reclaim_stop: Mutex::new(false),
            reclaim_wake: Condvar::new(),
            reclaim_gate: Mutex::new(()),
            reclaims: AtomicU64::new(0),
        });
        let committer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("mqttd-storage".into())
                .spawn(move || shared.commit_loop())?
        };
        let reclaimer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("mqttd-storage-reclaim".into())
                .spawn(move || shared.reclaim_loop())?
        };
        Ok(Self {
            shared,
            committer: Mutex::new(Some(committer)),
            reclaimer: Mutex::new(Some(reclaimer)),
        })
    }

    /// After a simulated power cut: declares the store failed, so that connections stop
    /// waiting for changes it will never make durable and the broker shuts down at once.
    #[cfg(test)]
    pub(crate) fn power_off(&self) {
        if self.shared.powered() {
            return;
        }
        self.shared.watermark.send_modify(|w| w.failed = true);
    }

    /// Counts the store's failures in `errors` from now on.
    pub(crate) fn count_errors(&self, errors: ErrorCounters) {
        let _ = self.shared.errors.set(errors);
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }
}

/// The engine's journal files (`*.jnl` in the store directory) and where their data ends.
///
/// The engine preallocates each new journal file (64 MiB of zeros) and, when it opens the
/// store, cuts every journal file at the end of its last valid change: the zeros, an incomplete
/// change (what a crash leaves while a change is being written), and anything from the first
/// damaged byte on. Only the last is lost data; the file's length says nothing about it.
fn journal_ends(path: &Path) -> Vec<(PathBuf, JournalEnd)> {
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
        .filter_map(|p| {
            let end = journal_end(&p).ok()?;
            Some((p, end))
        })
        .collect()
}

/// The journal the engine writes now: the one with the highest number (`N.jnl`; a new one
/// is created with the next number when the active one is sealed). `None` if there is none.
fn active_journal(path: &Path) -> Option<PathBuf> {
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let id = name.to_str()?.strip_suffix(".jnl")?.parse::<u64>().ok()?;
            Some((id, e.path()))
        })
        .max_by_key(|(id, _)| *id)
        .map(|(_, path)| path)
}

/// Where a journal file's data ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct JournalEnd {
    /// Just past the last complete change (its end marker).
    complete: u64,
    /// Just past the last byte that is not zero.
    data: u64,
}

/// The engine ends each change with an end marker: tag 3, an 8-byte checksum and the trailer
/// `FJL` 3 (fjall 3 `journal/entry.rs`; the trailer lets it tell a complete marker from one
/// cut short).
const END_MARKER_LEN: usize = 13;
const END_TAG: u8 = 3;
const END_TRAILER: &[u8] = b"FJL\x03";

fn is_end_marker(w: &[u8]) -> bool {
    w.first() == Some(&END_TAG) && w.get(9..) == Some(END_TRAILER)
}

/// Finds where `file`'s data and its last complete change end, reading back from its end (the
/// preallocated zeros are skipped a chunk at a time). A message payload that happens to hold an
/// end marker can only move `complete` later, which errs towards a report; damage to the last
/// change's own end marker makes that change look incomplete, and it is logged as a dropped tail.
fn journal_end(file: &Path) -> std::io::Result<JournalEnd> {
    use std::io::{Read, Seek, SeekFrom};
    const CHUNK: u64 = 1024 * 1024;
    // A marker across a chunk boundary is seen whole in the later chunk's read.
    const OVERLAP: u64 = END_MARKER_LEN as u64 - 1;
    let mut f = std::fs::File::open(file)?;
    let len = f.metadata()?.len();
    let mut data = None;
    let mut pos = len;
    let mut buf = Vec::new();
    while pos > 0 {
        let start = pos.saturating_sub(CHUNK);
        let end = pos.saturating_add(OVERLAP).min(len);
        buf.resize(usize::try_from(end - start).unwrap_or(0), 0);
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf)?;
        if data.is_none() {
            data = buf
                .iter()
                .rposition(|b| *b != 0)
                .map(|i| start + i as u64 + 1);
        }
        if let Some(data) = data {
            let limit = usize::try_from(data.min(end) - start).unwrap_or(0);
            let marker = buf
                .get(..limit)
                .and_then(|b| b.windows(END_MARKER_LEN).rposition(is_end_marker));
            if let Some(i) = marker {
                return Ok(JournalEnd {
                    complete: start + (i + END_MARKER_LEN) as u64,
                    data,
                });
            }
        }
        pos = start;
    }
    Ok(JournalEnd {
        complete: 0,
        data: data.unwrap_or(0),
    })
}

/// After the engine opened the store: how many bytes of complete changes it cut from the
/// journals measured `before` (lost data), and how many of an incomplete change at their end
/// (a write a crash interrupted). A journal the engine removed had been moved into the tables.
fn journal_cuts(before: &[(PathBuf, JournalEnd)]) -> (u64, u64) {
    let mut cut = 0u64;
    let mut tail = 0u64;
    for (file, end) in before {
        let Ok(meta) = std::fs::metadata(file) else {
            continue;
        };
        let kept = meta.len();
        cut = cut.saturating_add(end.complete.saturating_sub(kept));
        tail = tail.saturating_add(end.data.saturating_sub(kept.max(end.complete)));
    }
    (cut, tail)
}

#[cfg(test)]
mod journal_end_tests {
    use super::*;

    /// The committer syncs the journal with the highest number, by number, not by name.
    #[test]
    fn the_active_journal_is_the_highest_numbered() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(active_journal(dir.path()), None);
        for name in ["0.jnl", "9.jnl", "10.jnl", "x.jnl", "11.jnl.tmp", "lock"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(active_journal(dir.path()), Some(dir.path().join("10.jnl")));
    }

    /// An end marker with checksum `c`.
    fn marker(c: u8) -> Vec<u8> {
        let mut m = vec![END_TAG];
        m.extend_from_slice(&[c; 8]);
        m.extend_from_slice(END_TRAILER);
        m
    }

    fn end_of(bytes: &[u8]) -> JournalEnd {
        let dir = tempfile::tempdir().expect("temporary directory");
        let file = dir.path().join("0.jnl");
        std::fs::write(&file, bytes).expect("write a journal");
        journal_end(&file).expect("read the journal")
    }

    /// A change (start, an item, the end marker), `len` bytes before its marker.
    fn change(len: usize) -> Vec<u8> {
        let mut c = vec![1u8];
        c.resize(len, 7);
        c.extend(marker(9));
        c
    }

    #[test]
    fn complete_changes_then_preallocated_zeros() {
        let mut j = change(100);
        j.extend(change(5000));
        let complete = j.len() as u64;
        j.resize(3 * 1024 * 1024 + 17, 0);
        assert_eq!(
            end_of(&j),
            JournalEnd {
                complete,
                data: complete
            }
        );
    }

    #[test]
    fn incomplete_change_at_the_end() {
        let mut j = change(100);
        let complete = j.len() as u64;
        j.extend([1u8, 5, 5, 5]);
        let data = j.len() as u64;
        j.resize(2 * 1024 * 1024, 0);
        assert_eq!(end_of(&j), JournalEnd { complete, data });
    }

    /// Markers that straddle a chunk boundary (chunks are counted back from the file's end),
    /// and one whose data reaches into the last chunk.
    #[test]
    fn marker_across_chunk_boundaries() {
        const CHUNK: usize = 1024 * 1024;
        for cut in 1..END_MARKER_LEN {
            let total = 3 * CHUNK;
            // The marker's first `cut` bytes end exactly at the boundary `CHUNK` from the end.
            let marker_at = total - CHUNK - cut;
            let mut j = change(marker_at);
            assert_eq!(j.len(), marker_at + END_MARKER_LEN);
            let complete = j.len() as u64;
            j.resize(total, 0);
            assert_eq!(
                end_of(&j),
                JournalEnd {
                    complete,
                    data: complete
                },
                "marker split {cut}/{}",
                END_MARKER_LEN - cut
            );
        }
    }

    #[test]
    fn empty_and_markerless_files() {
        assert_eq!(end_of(&[]), JournalEnd::default());
        assert_eq!(end_of(&[0; 4096]), JournalEnd::default());
        assert_eq!(
            end_of(&[1, 2, 3, 0, 0]),
            JournalEnd {
                complete: 0,
                data: 3
            }
        );
    }
}

/// Record counts per keyspace, as the manifest holds them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    sessions: u64,
    deliveries: u64,
    retained: u64,
}

impl Counts {
    fn parse(text: &str) -> Option<Self> {
        let mut c = Self::default();
        for line in text.lines() {
            let (k, v) = line.split_once('=')?;
            let v = v.trim().parse().ok()?;
            match k.trim() {
                "sessions" => c.sessions = v,
                "messages" => c.deliveries = v,
                "retained" => c.retained = v,
                _ => {}
            }
        }
        Some(c)
    }

    fn render(&self) -> String {
        format!(
            "sessions = {}\nmessages = {}\nretained = {}\n",
            self.sessions, self.deliveries, self.retained
        )
    }
}

/// Where a recording operation writes.
enum Sink<'a> {
    Direct(&'a Shared),
    Batch(&'a mut fjall::OwnedWriteBatch),
}

impl Sink<'_> {
    fn insert(&mut self, ks: &Keyspace, key: Vec<u8>, value: Vec<u8>) -> Result<(), fjall::Error> {
        match self {
            Self::Direct(s) if !s.write() => Ok(()),
            Self::Direct(_) => ks.insert(key, value),
            Self::Batch(b) => {
                b.insert(ks, key, value);
                Ok(())
            }
        }
    }

    fn remove(&mut self, ks: &Keyspace, key: Vec<u8>) -> Result<(), fjall::Error> {
        match self {
            Self::Direct(s) if !s.write() => Ok(()),
            Self::Direct(_) => ks.remove(key),
            Self::Batch(b) => {
                b.remove(ks, key);
                Ok(())
            }
        }
    }
}

/// One change, as the recording calls describe it.
enum Change<'a> {
    Retain(&'a Arc<Message>),
    SaveSession(&'a SessionRecord),
    RemoveSession(&'a ClientId),
    RemoveMessages(&'a ClientId),
    StoreDelivery(&'a ClientId, u64, &'a Delivery),
    DeliveryFlow(&'a ClientId, u64, PacketId, OutboundState),
    DeliveryDone(&'a ClientId, u64, QoS),
    PendingRelease(&'a ClientId, PacketId, bool),
}

impl<'a> Change<'a> {
    /// Storing a delivery; nothing for one without a sequence number (not stored).
    fn store_delivery(client_id: &'a ClientId, delivery: &'a Delivery) -> Option<Self> {
        let seq = delivery.store_seq?;
        Some(Self::StoreDelivery(client_id, seq, delivery))
    }

    /// Forgetting a delivery; nothing for one without a sequence number (not stored).
    fn delivery_done(client_id: &'a ClientId, delivery: &'a Delivery) -> Option<Self> {
        let seq = delivery.store_seq?;
        Some(Self::DeliveryDone(client_id, seq, delivery.qos))
    }
}

/// A batch of changes written in one atomic write (see [`StorageBatch`]). Its ticket is
/// taken when it opens and held in `open_batches` until it is committed or dropped, so that
/// the watermark never covers it before its write.
struct DiskBatch<'a> {
    shared: &'a Shared,
    ticket: u64,
    /// `None` once committed, or if the store was not open.
    batch: Option<fjall::OwnedWriteBatch>,
    /// The store's generation when the batch opened.
    generation: u64,
    /// A change could not be recorded (or the store was not open): nothing will be written.
    failed: bool,
    /// Changes recorded.
    len: usize,
}

impl DiskBatch<'_> {
    fn record(&mut self, change: Change<'_>) {
        self.len += 1;
        if self.failed {
            return;
        }
        let Some(batch) = &mut self.batch else {
            return;
        };
        let s = self.shared;
        let open = s.engine.read();
        let result = match open.as_ref() {
            // A batch of a store since replaced writes nothing: its ticket is lost already.
            Some(e) if s.generation.load(Ordering::Acquire) == self.generation => {
                s.apply(e, &mut Sink::Batch(batch), change)
            }
            _ => Err(fjall::Error::Poisoned),
        };
        drop(open);
        if let Err(e) = result {
            self.failed = true;
            s.fail(self.generation, Op::Write, &e);
        }
    }
}

impl StorageBatch for DiskBatch<'_> {
    fn retain(&mut self, message: &Arc<Message>) {
        self.record(Change::Retain(message));
    }

    fn save_session(&mut self, record: &SessionRecord) {
        self.record(Change::SaveSession(record));
    }

    fn remove_session(&mut self, client_id: &ClientId) {
        self.record(Change::RemoveSession(client_id));
    }

    fn remove_messages(&mut self, client_id: &ClientId) {
        self.record(Change::RemoveMessages(client_id));
    }

    fn store_delivery(&mut self, client_id: &ClientId, delivery: &Delivery) {
        if let Some(change) = Change::store_delivery(client_id, delivery) {
            self.record(change);
        }
    }

    fn delivery_flow(
        &mut self,
        client_id: &ClientId,
        store_seq: u64,
        packet_id: PacketId,
        state: OutboundState,
    ) {
        self.record(Change::DeliveryFlow(client_id, store_seq, packet_id, state));
    }

    fn delivery_done(&mut self, client_id: &ClientId, delivery: &Delivery) {
        if let Some(change) = Change::delivery_done(client_id, delivery) {
            self.record(change);
        }
    }

    fn pending_release(&mut self, client_id: &ClientId, packet_id: PacketId, pending: bool) {
        self.record(Change::PendingRelease(client_id, packet_id, pending));
    }

    fn ticket(&self) -> Ticket {
        Ticket::new(self.ticket)
    }

    fn commit(mut self: Box<Self>) -> Ticket {
        let s = self.shared;
        let recorded = self.len > 0;
        if let Some(batch) = self.batch.take() {
            if recorded && !self.failed && s.write() {
                // Before the batch releases its ticket (below): the committer must not pass
                // it before the failure is declared.
                if let Err(e) = s.sync_step.check_write().and_then(|()| batch.commit()) {
                    s.fail(self.generation, Op::Write, &e);
                }
            }
        }
        let ticket = self.ticket();
        // Dropping releases the ticket to the committer.
        drop(self);
        if recorded {
            ticket
        } else {
            Ticket::NONE
        }
    }
}

impl Drop for DiskBatch<'_> {
    /// Committed or discarded, the batch no longer holds the watermark back.
    fn drop(&mut self) {
        let s = self.shared;
        s.recorded(self.ticket);
        s.open_batches.lock().remove(&self.ticket);
        s.wake_committer();
    }
}

fn session_prefix(client_id: &ClientId) -> Vec<u8> {
    let mut key = Vec::with_capacity(client_id.as_str().len() + 9);
    key.extend_from_slice(client_id.as_str().as_bytes());
    key.push(0);
    key
}

fn seq_key(client_id: &ClientId, seq: u64) -> Vec<u8> {
    let mut key = session_prefix(client_id);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn pid_key(client_id: &ClientId, packet_id: PacketId) -> Vec<u8> {
    let mut key = session_prefix(client_id);
    key.extend_from_slice(&packet_id.get().to_be_bytes());
    key
}

/// Splits a `client id, 0, suffix` key.
fn split_key(key: &[u8]) -> Option<(ClientId, &[u8])> {
    let zero = key.iter().position(|b| *b == 0)?;
    let (id, rest) = key.split_at(zero);
    let id = MqttStr::from_bytes(bytes::Bytes::copy_from_slice(id)).ok()?;
    Some((ClientId::new(id).ok()?, rest.get(1..)?))
}

impl Shared {
    /// Takes one write of data: false if a simulated power cut lost it.
    fn write(&self) -> bool {
        self.power_cut.as_ref().is_none_or(|c| c.write())
    }

    /// Whether the (simulated) power is still on: otherwise nothing at all is written.
    fn powered(&self) -> bool {
        self.power_cut.as_ref().is_none_or(|c| !c.happened())
    }

    /// Change `ticket` was recorded.
    fn recorded(&self, ticket: u64) {
        if let Some(c) = &self.power_cut {
            c.recorded(ticket);
        }
    }

    /// Records one change straight into the store and returns its ticket. A failure stops
    /// the watermark for good; the change still gets its ticket, so that what depends on it
    /// waits, and learns that the storage failed.
    fn record(&self, change: Change<'_>) -> Ticket {
        // Held until the ticket is taken: a store opened again after a failure takes every
        // ticket so far as lost, so none may be taken for a write into the old one after.
        let engine = self.engine.read();
        let generation = self.generation.load(Ordering::Acquire);
        let result = match engine.as_ref() {
            Some(e) => self
                .sync_step
                .check_write()
                .and_then(|()| self.apply(e, &mut Sink::Direct(self), change)),
            // Being opened again, or it could not be: the failure is known already.
            None => Err(fjall::Error::Poisoned),
        };
        // A failure is declared before the ticket is taken, so that no watermark the
        // committer publishes afterwards covers it.
        if let Err(e) = &result {
            self.fail(generation, Op::Write, e);
        }
        // Before the number is taken, so that the committer never sees it unmarked.
        self.recorded(self.written.load(Ordering::Acquire) + 1);
        let ticket = self.written.fetch_add(1, Ordering::AcqRel) + 1;
        drop(engine);
        if result.is_ok() {
            self.wake_committer();
        }
        Ticket::new(ticket)
    }

    /// Writes one change into `w`.
    fn apply(&self, e: &Engine, w: &mut Sink<'_>, change: Change<'_>) -> Result<(), fjall::Error> {
        match change {
            Change::Retain(message) => {
                let key = message.topic.as_str().as_bytes().to_vec();
                if message.payload.is_empty() {
                    w.remove(&e.retained, key)
                } else {
                    let value = record::encode_message(message, &Clock::now());
                    w.insert(&e.retained, key, value.to_vec())
                }
            }
            Change::SaveSession(record) => {
                let value = record::encode_session(record);
                let key = record.client_id.as_str().as_bytes().to_vec();
                w.insert(&e.sessions, key, value.to_vec())
            }
            Change::RemoveSession(client_id) => {
                w.remove(&e.sessions, client_id.as_str().as_bytes().to_vec())
            }
            Change::RemoveMessages(client_id) => {
                let prefix = session_prefix(client_id);
                let removed = remove_prefix(w, &e.deliveries, &prefix)?;
                self.count_removed(removed);
                remove_prefix(w, &e.flows, &prefix)?;
                remove_prefix(w, &e.inbound, &prefix)?;
                Ok(())
            }
            Change::StoreDelivery(client_id, seq, delivery) => {
                self.live_deliveries.fetch_add(1, Ordering::Relaxed);
                let value = record::encode_delivery(delivery, &Clock::now());
                w.insert(&e.deliveries, seq_key(client_id, seq), value.to_vec())
            }
            Change::DeliveryFlow(client_id, seq, packet_id, state) => {
                let value = record::encode_flow(packet_id, state);
                w.insert(&e.flows, seq_key(client_id, seq), value.to_vec())
            }
            Change::DeliveryDone(client_id, seq, qos) => {
                let key = seq_key(client_id, seq);
                // The message goes first: a crash between the two writes must not leave it
                // without the packet identifier it was sent under, or it would be sent again
                // as a new message. A flow left without its message is removed at the next
                // start.
                w.remove(&e.deliveries, key.clone())?;
                self.count_removed(1);
                if qos == QoS::ExactlyOnce {
                    w.remove(&e.flows, key)?;
                }
                Ok(())
            }
            Change::PendingRelease(client_id, packet_id, pending) => {
                let key = pid_key(client_id, packet_id);
                if pending {
                    w.insert(&e.inbound, key, Vec::new())
                } else {
                    w.remove(&e.inbound, key)
                }
            }
        }
    }

    /// An operation on the store of `generation` failed: unless that store was replaced
    /// since, the storage is failing until the committer opened it again and a sync went
    /// through. Counted per error (the engine refusing everything after its first error is
    /// not counted again; a failure of the engine's own background work counts as the write
    /// or sync that found it), logged once per failure episode.
    fn fail(&self, generation: u64, op: Op, e: &fjall::Error) {
        if generation != self.generation.load(Ordering::Acquire) {
            return;
        }
        let mut news = false;
        self.watermark.send_modify(|w| news = w.fail());
        // The engine refuses everything after a failure of its own (a write, or its
        // background flush running out of room) with `Poisoned`: that is news only once.
        if news || !matches!(e, fjall::Error::Poisoned) {
            if let Some(errors) = self.errors.get() {
                errors.get_or_create(&[("op", op.label())]).inc();
            }
        }
        self.reopen.store(true, Ordering::Release);
        if !self.failing.swap(true, Ordering::AcqRel) {
            error!(
                path = %self.path.display(),
                op = op.label(),
                error = %e,
                "storage failed: what depends on changes not yet durable is not acknowledged \
                 (those connections close), and the store is opened again until it works"
            );
        }
        let mut pending = self.pending.lock();
        *pending = true;
        self.wake.notify_one();
    }

    /// Opens the store again after a failure: the engine refuses every write after its first
    /// error. Every change recorded so far that is not durable is lost; what is recorded
    /// from now on goes to the new store.
    fn reopen(&self) -> bool {
        // First the reclaimer lets go of the old store (it stops between two steps once it
        // sees `reopen`); then no recording holds it either.
        let _gate = self.reclaim_gate.lock();
        let mut engine = self.engine.write();
        // The old store goes first: the engine locks its directory.
        *engine = None;
        match Engine::open(&self.path) {
            Ok(opened) => {
                *engine = Some(opened);
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.reopen.store(false, Ordering::Release);
                // No change is being recorded (the lock): this is the last of the old store.
                let last = self.written.load(Ordering::Acquire);
                self.watermark.send_modify(|w| w.recover(last));
                true
            }
            Err(e) => {
                if let Some(errors) = self.errors.get() {
                    errors.get_or_create(&[("op", Op::Open.label())]).inc();
                }
                debug!(path = %self.path.display(), error = %e, "the store cannot be opened again yet");
                false
            }
        }
    }

    fn wake_committer(&self) {
        if self.durability != Durability::None {
            let mut pending = self.pending.lock();
            if !*pending {
                *pending = true;
                self.wake.notify_one();
            }
        }
    }

    /// The latest change number that is safe to declare durable once synced: every change
    /// before the oldest batch still open.
    fn committable(&self) -> u64 {
        let open = self.open_batches.lock();
        let written = self.written.load(Ordering::Acquire);
        open.first().map_or(written, |t| written.min(t - 1))
    }

    /// How long the committer sleeps when nothing new arrives: until the next heartbeat, or,
    /// with writes of [`Durability::Batch`] not yet synced, until their fsync is due, so that
    /// a crash of the machine loses at most `interval` even when the traffic stops.
    fn idle_wait(&self, now: Instant, last_fsync: Instant, unsynced: bool) -> Duration {
        match self.durability {
            Durability::Sync => ALIVE_EVERY,
            Durability::Batch if unsynced => self
                .interval
                .saturating_sub(now.duration_since(last_fsync))
                .min(ALIVE_EVERY),
            Durability::Batch => ALIVE_EVERY,
            Durability::None => self.interval.min(ALIVE_EVERY),
        }
    }

    fn commit_loop(&self) {
        let start = self.sync_step.now();
        let mut last_alive = start.checked_sub(ALIVE_EVERY).unwrap_or(start);
        let mut last_fsync = start;
        // Whether a write to the operating system awaits its fsync.
        let mut unsynced = false;
        // How long to wait before opening the store again after a failure: doubles while
        // it keeps failing (opening replays the journal, which costs).
        let mut backoff = REOPEN_FIRST;
        loop {
            if self.reopen.load(Ordering::Acquire) {
                let until = Instant::now() + backoff;
                {
                    // Failures and new changes wake the committer too: only a stop cuts the
                    // wait short.
                    let mut pending = self.pending.lock();
                    while !self.stop.load(Ordering::Acquire) {
                        if self.wake.wait_until(&mut pending, until).timed_out() {
                            break;
                        }
                    }
                }
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                backoff = (backoff * 2).min(REOPEN_MAX);
                if !self.reopen() {
                    continue;
                }
            }
            {
                let mut pending = self.pending.lock();
                if !*pending && !self.stop.load(Ordering::Acquire) {
                    let wait = self.idle_wait(self.sync_step.now(), last_fsync, unsynced);
                    self.wake.wait_for(&mut pending, wait);
                }
                *pending = false;
            }
            let stopping = self.stop.load(Ordering::Acquire);
            let now = self.sync_step.now();
            if now.duration_since(last_alive) >= ALIVE_EVERY && !stopping && self.powered() {
                last_alive = now;
                let stamp = record::millis(SystemTime::now()).to_be_bytes();
                let engine = self.engine.read();
                let generation = self.generation.load(Ordering::Acquire);
                if let Some(e) = engine.as_ref() {
                    if let Err(e) = e.meta.insert(ALIVE, stamp.to_vec()) {
                        self.fail(generation, Op::Write, &e);
                    }
                }
            }
            let target = self.committable();
            // Never past a change a simulated power cut lost.
            let target = self.power_cut.as_ref().map_or(target, |c| {
                target.min(c.first_lost.load(Ordering::Acquire).saturating_sub(1))
            });
            let fsync = match self.durability {
                Durability::Sync => true,
                Durability::Batch | Durability::None => {
                    stopping || now.duration_since(last_fsync) >= self.interval
                }
            };
            let mode = if fsync {
                PersistMode::SyncData
            } else {
                PersistMode::Buffer
            };
            // The watermark moves only once this returned: what it claims is on disk.
            let (generation, result) = {
                let engine = self.engine.read();
                let generation = self.generation.load(Ordering::Acquire);
                let result = match engine.as_ref() {
                    Some(e) => self.sync_step.persist(&e.db, mode),
                    None => Err(fjall::Error::Poisoned),
                };
                (generation, result)
            };
            if fsync {
                last_fsync = now;
            }
            unsynced = !fsync;
            match result {
                Ok(()) => {
                    // Not while failing: a change whose write failed may be below `target`.
                    self.watermark.send_if_modified(|w| {
                        let moved = !w.failed && w.durable < target;
                        if moved {
                            w.durable = target;
                        }
                        moved
                    });
                    let works = !self.watermark.borrow().failed;
                    if works && self.failing.swap(false, Ordering::AcqRel) {
                        let w = *self.watermark.borrow();
                        info!(
                            path = %self.path.display(),
                            failures = w.failures,
                            lost = w.lost_upto.saturating_sub(w.lost_after),
                            "storage works again: changes are made durable and acknowledged again"
                        );
                        backoff = REOPEN_FIRST;
                    }
                }
                Err(e) => self.fail(generation, Op::Sync, &e),
            }
            if stopping {
                return;
            }
        }
    }

    /// Moves everything into the store's tables (so the journal holds nothing the next start
    /// must replay) and records how many records each kind has.
    fn write_manifest(&self) -> Result<(), StorageError> {
        let err = |e| engine(&self.path, e);
        let open = self.engine.read();
        let Some(e) = open.as_ref() else {
            return Err(StorageError::Engine("the store is not open".into()));
        };
        for ks in [
            &e.sessions,
            &e.deliveries,
            &e.flows,
            &e.inbound,
            &e.retained,
            &e.meta,
        ] {
            ks.rotate_memtable_and_wait().map_err(err)?;
        }
        e.db.persist(PersistMode::SyncAll).map_err(err)?;
        let counts = Counts {
            sessions: e.sessions.len().map_err(err)? as u64,
            deliveries: e.deliveries.len().map_err(err)? as u64,
            retained: e.retained.len().map_err(err)? as u64,
        };
        drop(open);
        let tmp = self.path.join(format!("{MANIFEST}.tmp"));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(counts.render().as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.path.join(MANIFEST))?;
        std::fs::File::open(&self.path)?.sync_all()?;
        Ok(())
    }
}

/// Removes every key of `ks` that starts with `prefix`; returns how many there were.
fn remove_prefix(w: &mut Sink<'_>, ks: &Keyspace, prefix: &[u8]) -> Result<u64, fjall::Error> {
    let keys: Vec<_> = ks
        .prefix(prefix)
        .map(fjall::Guard::key)
        .collect::<Result<_, _>>()?;
    let n = keys.len() as u64;
    for key in keys {
        w.remove(ks, key.to_vec())?;
    }
    Ok(n)
}

/// Why a reclaim stopped before its end.
#[derive(Debug)]
enum ReclaimStop {
    /// The store failed or is being opened again, or the broker is stopping: the reclaim
    /// lets go of the store's handles at once, so that it can be opened again (the engine
    /// locks its directory while any handle lives) or closed.
    Interrupted,
    /// A memory table was not flushed within [`RECLAIM_STEP_TIMEOUT`].
    FlushTimedOut,
    /// The engine failed.
    Engine(fjall::Error),
}

impl std::fmt::Display for ReclaimStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Interrupted => f.write_str("interrupted"),
            Self::FlushTimedOut => write!(
                f,
                "a memory table was not flushed within {} s",
                RECLAIM_STEP_TIMEOUT.as_secs()
            ),
            Self::Engine(e) => write!(f, "{e}"),
        }
    }
}

impl From<fjall::Error> for ReclaimStop {
    fn from(e: fjall::Error) -> Self {
        Self::Engine(e)
    }
}

impl Shared {
    /// Counts `n` stored messages removed, for the reclaimer.
    fn count_removed(&self, n: u64) {
        let _ = self
            .live_deliveries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |live| {
                Some(live.saturating_sub(n))
            });
        self.removed_deliveries.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether a reclaim under way must let go of the store: it failed (and is to be opened
    /// again), was replaced since `generation`, or the broker is stopping.
    fn reclaim_interrupted(&self, generation: u64) -> bool {
        self.reopen.load(Ordering::Acquire)
            || self.generation.load(Ordering::Acquire) != generation
            || self.stop.load(Ordering::Acquire)
            || *self.reclaim_stop.lock()
            || !self.powered()
    }

    /// Gives back the disk space of removed messages. The engine keeps a removed record as a
    /// tombstone beside the record it hides until a compaction merges the tables holding
    /// both, and its background compaction looks at table sizes, not at how much of them is
    /// dead: a queue that was filled and drained could keep its size on disk indefinitely.
    /// So once the messages removed since the last reclaim are many (or removals stopped for
    /// a while), and many times those still stored ([`RECLAIM_MIN_REMOVED`],
    /// [`RECLAIM_QUIET`], [`RECLAIM_RATIO`], at most every [`RECLAIM_MIN_INTERVAL`]), this
    /// thread moves every memory table into tables (which
    /// lets the engine delete the journals they covered) and compacts the message keyspaces
    /// fully, which drops the tombstones with what they hide. What it rewrites is the live
    /// records, a fraction of what it frees. Nothing acknowledged is at stake: compaction
    /// only rewrites tables, and the journal stays the record of changes until they are in a
    /// table.
    ///
    /// The reclaim works on its own handles of the open store, taken under the store's lock
    /// and used outside it, so that recording changes never waits for it. It does not run
    /// while the store is failing, and lets go of it between steps when the store fails or
    /// the broker stops; [`Self::reopen`] waits for that (`reclaim_gate`) before it closes
    /// the old store, and the next reclaim works on the new one.
    fn reclaim_loop(&self) {
        let mut last: Option<Instant> = None;
        // The removed count last seen, and since when it has not moved.
        let mut seen = (0, Instant::now());
        loop {
            {
                let mut stop = self.reclaim_stop.lock();
                if !*stop {
                    self.reclaim_wake.wait_for(&mut stop, RECLAIM_CHECK);
                }
                if *stop {
                    return;
                }
            }
            let removed = self.removed_deliveries.load(Ordering::Relaxed);
            let live = self.live_deliveries.load(Ordering::Relaxed);
            if removed != seen.0 {
                seen = (removed, Instant::now());
            }
            let quiet = seen.1.elapsed() >= RECLAIM_QUIET;
            let due = (removed >= RECLAIM_MIN_REMOVED || (quiet && removed > 0))
                && removed >= RECLAIM_RATIO.saturating_mul(live)
                && last.is_none_or(|t| t.elapsed() >= RECLAIM_MIN_INTERVAL);
            if !due || self.failing.load(Ordering::Acquire) {
                continue;
            }
            let gate = self.reclaim_gate.lock();
            let (generation, engine) = {
                let open = self.engine.read();
                let generation = self.generation.load(Ordering::Acquire);
                (generation, open.clone())
            };
            let Some(engine) = engine else {
                continue;
            };
            if self.reclaim_interrupted(generation) {
                continue;
            }
            last = Some(Instant::now());
            self.removed_deliveries
                .fetch_sub(removed, Ordering::Relaxed);
            seen.0 = seen.0.saturating_sub(removed);
            let before = engine.db.disk_space().unwrap_or(0);
            let started = Instant::now();
            let result = self.reclaim(&engine, generation);
            let after = engine.db.disk_space().unwrap_or(0);
            // The handles go before the gate opens: a reopening may close the store now.
            drop(engine);
            drop(gate);
            match result {
                Ok(()) => {
                    self.reclaims.fetch_add(1, Ordering::Relaxed);
                    info!(
                    path = %self.path.display(),
                    removed,
                    live,
                    before_bytes = before,
                    after_bytes = after,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "reclaimed the disk space of removed messages"
                    );
                }
                Err(ReclaimStop::Interrupted) => {
                    // Not done: the next reclaim, on the store opened again, does it.
                    self.removed_deliveries
                        .fetch_add(removed, Ordering::Relaxed);
                    last = None;
                }
                Err(e) => {
                    if let Some(errors) = self.errors.get() {
                        errors.get_or_create(&[("op", Op::Reclaim.label())]).inc();
                    }
                    warn!(
                        path = %self.path.display(),
                        error = %e,
                        "cannot reclaim the disk space of removed messages; the engine's \
                         background compaction still will, later"
                    );
                }
            }
        }
    }

    /// See [`Self::reclaim_loop`]. `e` is the store of `generation`.
    fn reclaim(&self, e: &Engine, generation: u64) -> Result<(), ReclaimStop> {
        for ks in [
            &e.sessions,
            &e.deliveries,
            &e.flows,
            &e.inbound,
            &e.retained,
            &e.meta,
        ] {
            self.flush_memtable(ks, generation)?;
        }
        for ks in [&e.deliveries, &e.flows, &e.inbound] {
            if self.reclaim_interrupted(generation) {
                return Err(ReclaimStop::Interrupted);
            }
            ks.major_compact()?;
        }
        // The engine deletes the journals whose changes are all in tables when a memory
        // table is next sealed, not when the flush ends: seal one more.
        if self.reclaim_interrupted(generation) {
            return Err(ReclaimStop::Interrupted);
        }
        let stamp = record::millis(SystemTime::now()).to_be_bytes();
        e.meta.insert(ALIVE, stamp.to_vec())?;
        self.flush_memtable(&e.meta, generation)
    }

    /// Seals `ks`'s memory table and waits until it is in a table. Unlike the engine's own
    /// wait, this one ends: a flush that failed (a full disk) leaves its memory table sealed
    /// for ever.
    fn flush_memtable(&self, ks: &Keyspace, generation: u64) -> Result<(), ReclaimStop> {
        if self.reclaim_interrupted(generation) {
            return Err(ReclaimStop::Interrupted);
        }
        ks.rotate_memtable()?;
        let deadline = Instant::now() + RECLAIM_STEP_TIMEOUT;
        while ks.sealed_memtable_count() > 0 {
            if self.reclaim_interrupted(generation) {
                return Err(ReclaimStop::Interrupted);
            }
            if Instant::now() >= deadline {
                return Err(ReclaimStop::FlushTimedOut);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Shared {
    /// Reads every record of one keyspace; damaged ones are counted, reported and removed.
    fn scan<T>(
        &self,
        ks: &Keyspace,
        what: &str,
        mut read: impl FnMut(&[u8], &[u8]) -> Option<T>,
    ) -> Result<Vec<T>, StorageError> {
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        for guard in ks.iter() {
            let (key, value) = guard.into_inner().map_err(|e| engine(&self.path, e))?;
            match read(&key, &value) {
                Some(v) => out.push(v),
                None => damaged.push(key),
            }
        }
        if !damaged.is_empty() {
            warn!(
                path = %self.path.display(),
                count = damaged.len(),
                "dropped {} damaged {what} record(s) from the store",
                damaged.len()
            );
            for key in damaged {
                ks.remove(key).map_err(|e| engine(&self.path, e))?;
            }
        }
        Ok(out)
    }
}

impl Storage for DiskStorage {
    fn recover(&self) -> Result<Recovered, StorageError> {
        let s = &*self.shared;
        let open = s.engine.read();
        let Some(e) = open.as_ref() else {
            return Err(StorageError::Engine("the store is not open".into()));
        };
        let started = Instant::now();
        let clock = Clock::now();
        let meta = |key| {
            e.meta
                .get(key)
                .map_err(|err| engine(&s.path, err))
                .map(|v| v.map(|v| v.to_vec()))
        };
        let clean = meta(CLEAN)?.is_some();
        let alive = meta(ALIVE)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(|b| record::system_time(u64::from_be_bytes(b)));
        if clean {
            e.meta.remove(CLEAN).map_err(|err| engine(&s.path, err))?;
        }
        let manifest_path = s.path.join(MANIFEST);
        let expected = std::fs::read_to_string(&manifest_path)
            .ok()
            .map(|text| Counts::parse(&text));

        let retained = s.scan(&e.retained, "retained message", |_, v| {
            record::decode_message(v, &clock).ok().map(Arc::new)
        })?;
        let records = s.scan(&e.sessions, "session", |k, v| {
            let id =
                ClientId::new(MqttStr::from_bytes(bytes::Bytes::copy_from_slice(k)).ok()?).ok()?;
            record::decode_session(v, id).ok()
        })?;
        let mut sessions: HashMap<ClientId, StoredSession> = records
            .into_iter()
            .map(|record| {
                (
                    record.client_id.clone(),
                    StoredSession {
                        record,
                        deliveries: Vec::new(),
                        pending_releases: Vec::new(),
                    },
                )
            })
            .collect();

        let flows = s.scan(&e.flows, "flow", |k, v| {
            let (id, seq) = split_key(k)?;
            let seq = u64::from_be_bytes(seq.try_into().ok()?);
            Some(((id, seq), record::decode_flow(v).ok()?))
        })?;
        let mut flows: HashMap<(ClientId, u64), _> = flows.into_iter().collect();
        let mut orphans = Vec::new();
        let mut next_seq = 1;
        let deliveries = s.scan(&e.deliveries, "message", |k, v| {
            let (id, seq) = split_key(k)?;
            let seq = u64::from_be_bytes(seq.try_into().ok()?);
            Some((
                k.to_vec(),
                id,
                record::decode_delivery(v, seq, &clock).ok()?,
            ))
        })?;
        let mut expired = 0usize;
        for (key, id, delivery) in deliveries {
            let seq = delivery.store_seq.unwrap_or(0);
            next_seq = next_seq.max(seq + 1);
            let Some(session) = sessions.get_mut(&id) else {
                orphans.push(key);
                continue;
            };
            if delivery.message.is_expired(clock.instant) {
                expired += 1;
                orphans.push(key);
                continue;
            }
            let flow = flows.remove(&(id.clone(), seq));
            session.deliveries.push(StoredDelivery { delivery, flow });
        }
        let inbound = s.scan(&e.inbound, "QoS 2 state", |k, _| {
            let (id, pid) = split_key(k)?;
            let pid = PacketId::new(u16::from_be_bytes(pid.try_into().ok()?))?;
            Some((id, pid))
        })?;
        for (id, pid) in inbound {
            match sessions.get_mut(&id) {
                Some(session) => session.pending_releases.push(pid),
                None => orphans.push(pid_key(&id, pid)),
            }
        }
        // Flows whose message is gone (finished just before a crash).
        orphans.extend(flows.into_keys().map(|(id, seq)| seq_key(&id, seq)));
        // What a crash left behind of a session's removal, and expired messages.
        for key in &orphans {
            for ks in [&e.deliveries, &e.flows, &e.inbound] {
                ks.remove(key.as_slice())
                    .map_err(|err| engine(&s.path, err))?;
            }
        }
        let sessions: Vec<StoredSession> = sessions.into_values().collect();
        let messages: usize = sessions.iter().map(|s| s.deliveries.len()).sum();
        s.live_deliveries.store(messages as u64, Ordering::Relaxed);
        let found = Counts {
            sessions: sessions.len() as u64,
            deliveries: (messages + expired) as u64,
            retained: retained.len() as u64,
        };
        match expected {
            Some(Some(expected)) if expected != found => warn!(
                path = %s.path.display(),
                "the store is damaged: it held {} session(s), {} message(s) and {} retained \
                 message(s) at the last clean shutdown, and {} session(s), {} message(s) and \
                 {} retained message(s) could be recovered; the rest was dropped",
                expected.sessions,
                expected.deliveries,
                expected.retained,
                found.sessions,
                found.deliveries,
                found.retained,
            ),
            Some(None) => warn!(
                path = %manifest_path.display(),
                "the clean-shutdown manifest is damaged; cannot check the store for lost records"
            ),
            _ => {}
        }
        if s.journal_cut > 0 {
            // A clean shutdown moves every change into the tables: if they still hold every
            // record it counted, the damaged part of the journal held nothing the store needs.
            if expected == Some(Some(found)) {
                warn!(
                    path = %s.path.display(),
                    bytes = s.journal_cut,
                    "the store's journal was damaged: {} byte(s) of complete changes after the \
                     damage were dropped; the last shutdown was clean and had moved them into \
                     the store's tables, and every record it counted was recovered, so nothing \
                     is lost",
                    s.journal_cut
                );
            } else {
                warn!(
                    path = %s.path.display(),
                    bytes = s.journal_cut,
                    "the store's journal was damaged: {} byte(s) of complete changes after the \
                     damage were dropped, and the changes recorded there are lost",
                    s.journal_cut
                );
            }
        }
        // From now on a crash must not be checked against these counts.
        if expected.is_some() {
            std::fs::remove_file(&manifest_path)?;
        }
        info!(
            path = %s.path.display(),
            sessions = sessions.len(),
            messages,
            retained = retained.len(),
            expired,
            clean_shutdown = clean,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovered stored state"
        );
        Ok(Recovered {
            retained,
            sessions,
            crashed_at: if clean { None } else { alive },
            next_seq,
        })
    }

    fn retain(&self, message: &Arc<Message>) -> Ticket {
        self.shared.record(Change::Retain(message))
    }

    fn save_session(&self, record: &SessionRecord) -> Ticket {
        self.shared.record(Change::SaveSession(record))
    }

    fn remove_session(&self, client_id: &ClientId) -> Ticket {
        self.shared.record(Change::RemoveSession(client_id))
    }

    fn remove_messages(&self, client_id: &ClientId) -> Ticket {
        self.shared.record(Change::RemoveMessages(client_id))
    }

    fn store_delivery(&self, client_id: &ClientId, delivery: &Delivery) -> Ticket {
        Change::store_delivery(client_id, delivery)
            .map_or(Ticket::NONE, |change| self.shared.record(change))
    }

    fn delivery_flow(
        &self,
        client_id: &ClientId,
        store_seq: u64,
        packet_id: PacketId,
        state: OutboundState,
    ) -> Ticket {
        self.shared
            .record(Change::DeliveryFlow(client_id, store_seq, packet_id, state))
    }

    fn delivery_done(&self, client_id: &ClientId, delivery: &Delivery) -> Ticket {
        Change::delivery_done(client_id, delivery)
            .map_or(Ticket::NONE, |change| self.shared.record(change))
    }

    fn pending_release(&self, client_id: &ClientId, packet_id: PacketId, pending: bool) -> Ticket {
        self.shared
            .record(Change::PendingRelease(client_id, packet_id, pending))
    }

    fn open_batch(&self) -> Option<Box<dyn StorageBatch + '_>> {
        let s = &*self.shared;
        // The batch's number is taken now, before anything in it can be seen, so that
        // whatever depends on it waits for it; the committer holds its watermark below it
        // until it is written.
        // The store's read lock orders the ticket with a reopening, as for a single change.
        let open = s.engine.read();
        let generation = s.generation.load(Ordering::Acquire);
        let ticket = {
            let mut batches = s.open_batches.lock();
            let ticket = s.written.fetch_add(1, Ordering::AcqRel) + 1;
            batches.insert(ticket);
            ticket
        };
        let batch = open.as_ref().map(|e| e.db.batch());
        drop(open);
        Some(Box::new(DiskBatch {
            shared: s,
            ticket,
            failed: batch.is_none(),
            batch,
            generation,
            len: 0,
        }))
    }

    fn watermark(&self) -> watch::Receiver<Watermark> {
        self.shared.watermark.subscribe()
    }

    fn is_durable(&self) -> bool {
        self.shared.durability != Durability::None
    }

    fn close(&self) {
        let s = &*self.shared;
        if !s.powered() {
            return;
        }
        let marked = match s.engine.read().as_ref() {
            Some(e) => e.meta.insert(CLEAN, vec![1]),
            None => Err(fjall::Error::Poisoned),
        };
        if let Err(e) = marked {
            warn!(error = %e, "cannot mark the store as cleanly closed");
        }
        s.stop.store(true, Ordering::Release);
        {
            let mut pending = s.pending.lock();
            *pending = true;
            s.wake.notify_one();
        }
        if let Some(committer) = self.committer.lock().take() {
            let _ = committer.join();
        }
        self.stop_reclaimer();
        // Everything is durable by now; the manifest only lets the next start check for
        // damage. Shutdown does not wait for it for ever.
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = self.shared.clone();
        let _ = std::thread::Builder::new()
            .name("mqttd-storage-close".into())
            .spawn(move || {
                let _ = tx.send(shared.write_manifest());
            });
        match rx.recv_timeout(MANIFEST_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(path = %s.path.display(), error = %e, "cannot write the clean-shutdown manifest");
            }
            Err(_) => warn!(
                path = %s.path.display(),
                "the store did not finish compacting its memory tables in time; the next start \
                 replays its journal and cannot check for lost records"
            ),
        }
    }
}

impl Drop for DiskStorage {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let mut pending = self.shared.pending.lock();
            *pending = true;
            self.shared.wake.notify_one();
        }
        if let Some(committer) = self.committer.get_mut().take() {
            let _ = committer.join();
        }
        self.stop_reclaimer();
    }
}

impl DiskStorage {
    /// Stops the reclaimer, waiting for a reclaim under way to finish.
    fn stop_reclaimer(&self) {
        *self.shared.reclaim_stop.lock() = true;
        self.shared.reclaim_wake.notify_one();
        if let Some(reclaimer) = self.reclaimer.lock().take() {
            let _ = reclaimer.join();
        }
    }
}

#[cfg(test)]
mod tests;
