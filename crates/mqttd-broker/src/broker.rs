//! State shared by every connection: the subscription index, the session registry, retained
//! messages, and routing.
//!
//! Routing a message reads a snapshot of the subscription trie (no lock) and hands a
//! [`Delivery`] to each matching session's [`SessionHandle`]. A handle's own mutex guards only
//! that session: while its client is connected, deliveries go to the connection's mailbox;
//! while it is offline, they are queued in the stored [`Session`] with its bounds.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use parking_lot::Mutex;
use smallvec::SmallVec;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use mqttd_proto::server::ServerConfig;
use mqttd_proto::session::{Enqueued, OutboundState, Session, SessionEvent};
use mqttd_proto::{ClientId, Delivery, Message, QoS, ReasonCode, SubscriptionOptions, TopicFilter};

use crate::access::AccessControl;
use crate::auth::ScramServer;
use crate::config::{Config, OfflineQos0};
use crate::hooks::{Action, ClientInfo, ConnectAttempt, Hooks, Transport, Verdict};
use crate::metrics::Metrics;
use crate::retained::{RetainLimits, RetainRefused, RetainedStore};
use crate::storage::record::{self, Clock};
use crate::storage::{
    Batch, Recovered, SessionRecord, Storage, StoredDelivery, StoredWill, Ticket,
};
use crate::topic_tree::{Match, SharedGroup, TopicTree};

/// How long a connecting client waits for the connection it takes over to hand its session on.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// A subscription as stored in the trie.
#[derive(Debug, Clone)]
pub(crate) struct Subscriber {
    pub(crate) handle: Arc<SessionHandle>,
    pub(crate) options: SubscriptionOptions,
    pub(crate) id: Option<NonZeroU32>,
    /// For a shared subscription, its filter, so that a message can move to another member.
    pub(crate) shared: Option<TopicFilter>,
}

pub(crate) type Tree = TopicTree<u64, Subscriber>;

/// A connection's inbox: messages routed to its session, and a takeover request from another
/// connection. It allocates nothing until something arrives, so an idle connection pays only
/// for the struct itself.
///
/// Arrivals wake the connection's task through `notify`; a connection parked without a task
/// (see `drivers::park`) registers a [`Waker`] instead, woken once by the next arrival.
#[derive(Debug, Default)]
pub(crate) struct Mailbox {
    slots: Mutex<Slots>,
    notify: Notify,
    /// Who the client is, set once its CONNECT is accepted (for the admin API).
    pub(crate) conn: std::sync::OnceLock<Box<ConnInfo>>,
    /// The connection's counters (for the admin API).
    pub(crate) stats: ConnStats,
    /// Reads a QUIC connection's path figures when asked (for the admin API).
    pub(crate) path: std::sync::OnceLock<PathProbe>,
    /// Another node took the session while this connection was handing it over: whatever
    /// its output holds back for storage never goes out ([`Mailbox::abandon_output`]).
    output_abandoned: AtomicBool,
}

/// The path of a QUIC connection (or a node's) as the admin API shows it.
#[derive(Debug, Clone)]
pub(crate) struct QuicPathView {
    /// Smoothed round-trip time.
    pub(crate) rtt: Duration,
    /// Congestion window, in bytes.
    pub(crate) cwnd: u64,
    /// Congestion events.
    pub(crate) congestion_events: u64,
    /// QUIC packets sent.
    pub(crate) sent_packets: u64,
    /// QUIC packets declared lost.
    pub(crate) lost_packets: u64,
    /// UDP datagrams received.
    pub(crate) received_datagrams: u64,
    /// The client's address on the path now (after any migration); `None` through a relay.
    pub(crate) remote: Option<std::net::SocketAddr>,
    /// The relay's URL, for a node's connection relayed now.
    pub(crate) relay: Option<String>,
}

/// Reads a connection's path figures on demand. It holds the connection weakly: it never
/// keeps one open, and gives `None` once it closed.
pub(crate) struct PathProbe(pub(crate) Box<dyn Fn() -> Option<QuicPathView> + Send + Sync>);

impl std::fmt::Debug for PathProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PathProbe")
    }
}

/// A connected client as the admin API shows it: what its CONNECT settled.
#[derive(Debug)]
pub(crate) struct ConnInfo {
    /// Shared with the connection's core, which holds the same (until a re-authentication
    /// changes its user name).
    pub(crate) client: Arc<ClientInfo>,
    /// The keep alive the broker enforces, in seconds.
    pub(crate) keep_alive: u16,
    pub(crate) clean_start: bool,
    /// The session expiry interval granted, in seconds.
    pub(crate) session_expiry: u32,
    /// When it was accepted, by the broker's clock (the core has no wall clock).
    pub(crate) connected_at: Instant,
}

/// A connection's counters: relaxed atomics its core bumps as it goes, cheap enough to keep
/// for every connection; the admin API reads them.
#[derive(Debug, Default)]
pub(crate) struct ConnStats {
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    /// PUBLISH packets received.
    pub(crate) messages_in: AtomicU64,
    /// PUBLISH packets sent.
    pub(crate) messages_out: AtomicU64,
    /// Messages in the session's queue, as of the core's last look.
    pub(crate) queued: AtomicU32,
    /// Messages sent and not yet acknowledged, as of the core's last look.
    pub(crate) in_flight: AtomicU32,
    /// Whether the listener's totals hold these counters (the connection ended): the admin
    /// API then counts them there, not again as a live connection's. Written under the
    /// totals' lock.
    pub(crate) folded: AtomicBool,
}

impl ConnStats {
    /// Adds `n` to `counter`.
    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Sets a gauge, writing only if it changed (no cache traffic for an unchanged value).
    pub(crate) fn set(gauge: &AtomicU32, n: usize) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        if gauge.load(Ordering::Relaxed) != n {
            gauge.store(n, Ordering::Relaxed);
        }
    }
}

/// What a [`Mailbox`]'s lock guards.
#[derive(Debug, Default)]
struct Slots {
    inbox: Inbox,
    /// The waker of a parked connection, taken by the next arrival.
    waker: Option<Waker>,
}

/// What waits in a [`Mailbox`].
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    /// Messages for the session, oldest first.
    pub(crate) deliveries: VecDeque<Delivery>,
    /// Another connection claims the session: disconnect with 0x8E and hand the session over.
    pub(crate) takeover: Option<SessionReply>,
    /// The storage change the stored deliveries here depend on: they are sent only once it
    /// is durable.
    pub(crate) ticket: Ticket,
    /// The connection is asked to close with this reason (MQTT 5; a plain close otherwise):
    /// 0x98 an administrator's action, 0x9C a cluster node cut off from its quorum.
    pub(crate) kick: Option<ReasonCode>,
    /// With `takeover`: another node took the session (in a cluster). What the connection
    /// holds back for storage is dropped, not sent (the cluster refused those changes), and
    /// this is told once the connection has stopped serving the session.
    pub(crate) abandon: Option<oneshot::Sender<()>>,
}

impl Mailbox {
    /// Queues a delivery unless `limit` are already waiting; returns whether it was queued.
    /// `admit` runs first, under the mailbox's lock, so that what it records happens before
    /// the connection can see the delivery.
    pub(crate) fn push(
        &self,
        mut delivery: Delivery,
        limit: usize,
        admit: impl FnOnce(&mut Delivery) -> Ticket,
    ) -> Result<(), Delivery> {
        let mut slots = self.slots.lock();
        if slots.inbox.deliveries.len() >= limit {
            return Err(delivery);
        }
        let ticket = admit(&mut delivery);
        slots.inbox.ticket.merge(ticket);
        slots.inbox.deliveries.push_back(delivery);
        let waker = slots.waker.take();
        drop(slots);
        self.arrived(waker);
        Ok(())
    }

    /// How many deliveries wait.
    fn len(&self) -> usize {
        self.slots.lock().inbox.deliveries.len()
    }

    /// Asks the connection to close with `reason`.
    pub(crate) fn kick(&self, reason: ReasonCode) {
        let mut slots = self.slots.lock();
        slots.inbox.kick = Some(reason);
        let waker = slots.waker.take();
        drop(slots);
        self.arrived(waker);
    }

    pub(crate) fn take_over(&self, reply: SessionReply) {
        self.take_over_as(reply, None);
    }

    /// As [`Mailbox::take_over`]; with `abandon`, another node took the session: what the
    /// connection holds back for storage is never sent, and `abandon` is told once the
    /// connection has stopped serving the session.
    pub(crate) fn take_over_as(&self, reply: SessionReply, abandon: Option<oneshot::Sender<()>>) {
        let mut slots = self.slots.lock();
        slots.inbox.takeover = Some(reply);
        if abandon.is_some() {
            slots.inbox.abandon = abandon;
        }
        let waker = slots.waker.take();
        drop(slots);
        self.arrived(waker);
    }

    /// The session this connection is handing over went to another node of the cluster
    /// meanwhile: what its output holds back for storage (changes the cluster refuses) is
    /// dropped, not sent once the holds are let go, and nothing but DISCONNECT follows.
    pub(crate) fn abandon_output(&self) {
        self.output_abandoned.store(true, Ordering::Release);
        self.arrived(self.slots.lock().waker.take());
    }

    /// Whether [`Mailbox::abandon_output`] was called.
    pub(crate) fn output_abandoned(&self) -> bool {
        self.output_abandoned.load(Ordering::Acquire)
    }

    /// Wakes the connection's task, or the parked connection's `waker`.
    fn arrived(&self, waker: Option<Waker>) {
        self.notify.notify_one();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Everything waiting, leaving the mailbox empty.
    pub(crate) fn take(&self) -> Inbox {
        std::mem::take(&mut self.slots.lock().inbox)
    }

    /// Resolves when something arrived since the last call.
    pub(crate) async fn wait(&self) {
        self.notify.notified().await;
    }

    /// Has the next arrival wake `waker` (once), for a connection parked without a task.
    /// Returns `false`, registering nothing, if something waits already.
    pub(crate) fn wake_on_arrival(&self, waker: &Waker) -> bool {
        let mut slots = self.slots.lock();
        if !slots.inbox.deliveries.is_empty()
            || slots.inbox.takeover.is_some()
            || slots.inbox.kick.is_some()
        {
            return false;
        }
        slots.waker = Some(waker.clone());
        true
    }

    /// Forgets the waker [`Self::wake_on_arrival`] registered: the connection has its task
    /// again.
    pub(crate) fn forget_waker(&self) {
        self.slots.lock().waker = None;
    }
}

/// Where a connection that is taken over hands its session: to the connection taking it over,
/// which waits for it (`None` if the session ended with the old connection).
#[derive(Debug)]
pub(crate) struct SessionReply(pub(crate) oneshot::Sender<Option<Session>>);

impl SessionReply {
    /// Hands the session over; if the new connection stopped waiting, the session comes back.
    pub(crate) fn send(self, session: Option<Session>) -> Result<(), Box<Option<Session>>> {
        self.0.send(session).map_err(Box::new)
    }
}

/// Where a session's messages go right now.
#[derive(Debug)]
pub(crate) enum Slot {
    /// Its client is connected.
    Online { mailbox: Arc<Mailbox> },
    /// Moving between connections; deliveries wait here. `from`: the mailbox of the
    /// connection it is being taken from, while that one may still be sending.
    Transferring {
        buffer: Vec<Delivery>,
        from: Option<Arc<Mailbox>>,
    },
    /// No client is connected; the broker holds the session and runs its timers.
    Offline {
        session: Box<Session>,
        generation: u64,
        /// When its connection ended.
        since: SystemTime,
        /// Stops the session's timer task when the session leaves this slot (a client
        /// resumes it, or it ends), so that a reconnect leaves no sleeping task behind.
        _timers: DropGuard,
    },
    /// The session is over.
    Ended,
}

/// What a session subscribed with to one filter.
pub(crate) type Subscribed = (SubscriptionOptions, Option<NonZeroU32>);

/// A session's subscriptions, by filter. One pointer while there are none, as for most idle
/// clients: every session handle pays its size, and a `HashMap` is 48 bytes.
// Boxed on purpose: one word while empty instead of the map's six.
#[allow(clippy::box_collection)]
#[derive(Debug, Default)]
pub(crate) struct Subscriptions(Option<Box<HashMap<TopicFilter, Subscribed>>>);

impl Subscriptions {
    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    pub(crate) fn contains_key(&self, filter: &TopicFilter) -> bool {
        self.0.as_ref().is_some_and(|m| m.contains_key(filter))
    }

    pub(crate) fn insert(&mut self, filter: TopicFilter, subscribed: Subscribed) {
        self.0.get_or_insert_default().insert(filter, subscribed);
    }

    /// Removes `filter`'s subscription, and the table with the last one.
    pub(crate) fn remove(&mut self, filter: &TopicFilter) {
        if let Some(m) = &mut self.0 {
            m.remove(filter);
            if m.is_empty() {
                self.0 = None;
            }
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&TopicFilter, &Subscribed)> {
        self.0.iter().flat_map(|m| m.iter())
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &TopicFilter> {
        self.iter().map(|(f, _)| f)
    }

    /// Takes every subscription, leaving none.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = (TopicFilter, Subscribed)> {
        self.0.take().into_iter().flat_map(|m| m.into_iter())
    }
}

/// One session in the registry.
#[derive(Debug)]
pub(crate) struct SessionHandle {
    pub(crate) key: u64,
    pub(crate) client_id: ClientId,
    pub(crate) slot: Mutex<Slot>,
    /// The session's subscriptions, so they can be removed from the trie when it ends.
    pub(crate) subscriptions: Mutex<Subscriptions>,
    /// Set while the connection's output is backed up: publishers of QoS 0 messages for it
    /// wait (as for a full queue) until it drains, or drop them once it is stalled, so that a
    /// client that reads slowly sets the pace and one that does not read costs the others
    /// little.
    pub(crate) congested: AtomicBool,
    /// Set while the session's queue is full: any further message would be dropped by the
    /// queue, so it is dropped before the hand-over.
    pub(crate) saturated: AtomicBool,
    /// Set when a publisher gave up waiting for room in this session's full queue: further
    /// messages are dropped at once, until the queue has room again.
    pub(crate) stalled: AtomicBool,
    /// Signalled when the full queue of an online session has room again, or its
    /// connection's output drained.
    pub(crate) room: Notify,
    /// How many more messages the connection's session can take (queue and in-flight
    /// window), as of the connection's last look: what its mailbox may hold.
    pub(crate) capacity: AtomicUsize,
    /// Counts the times the connection found more room than before: a publisher waiting for
    /// room gives up only on a session that makes no progress.
    pub(crate) progress: AtomicU64,
    /// Whether the session outlives its connection: its QoS 1 and 2 messages are stored.
    pub(crate) persistent: AtomicBool,
    /// Whether this session counts against `max_sessions` (see [`SessionCount`]).
    pub(crate) counted: AtomicBool,
    /// Whether storage holds a record of this session, to forget when it ends.
    pub(crate) stored: AtomicBool,
    /// Whether storage holds messages or QoS 2 state of this session.
    pub(crate) stored_messages: AtomicBool,
    /// Messages the connection's session holds (queued, in flight, waiting to be durable),
    /// as of the connection's last look: what a bridge's metrics report as queued.
    pub(crate) backlog: AtomicUsize,
}

impl SessionHandle {
    /// Hands a message to the session wherever it is. Returns false if it was dropped.
    ///
    /// What waits for a connection's task, or for a session moving between connections, is
    /// bounded like the session's own queue (plus its in-flight window): a task that falls
    /// behind cannot make the broker hold more than the session itself would.
    ///
    /// A QoS 1 or 2 message for a persistent session is stored, under a new sequence number,
    /// before anyone can act on it; storing happens under the session's lock, so it is
    /// recorded before any acknowledgement that removes it.
    pub(crate) fn deliver(&self, now: Instant, delivery: Delivery, inner: &Inner) -> bool {
        let mut batch = Batch::direct(&*inner.storage);
        let taken = matches!(
            self.hand_over(now, delivery, inner, &mut batch, false),
            Handed::Taken
        );
        // The session waits for its stored copy itself (see `Mailbox::push`); nothing else
        // does.
        let _ = batch.commit();
        taken
    }

    /// As [`SessionHandle::deliver`], but a delivery that finds its connection's mailbox
    /// full comes back, to wait for room, unless `force`: then the mailbox takes it beyond
    /// its limit (see [`Inner::route_whole`]). The copy is stored through `batch`, whose
    /// ticket then covers it.
    pub(crate) fn hand_over(
        &self,
        now: Instant,
        mut delivery: Delivery,
        inner: &Inner,
        batch: &mut Batch<'_>,
        force: bool,
    ) -> Handed {
        let limit = Self::limit(inner);
        let persist = delivery.qos != QoS::AtMostOnce && self.persistent.load(Ordering::Relaxed);
        if persist && delivery.shared.is_none() && inner.owned_by_cluster(self) {
            // The cluster queues this copy for the session (the publication's `Publish`)
            // and its owner delivers it from there.
            return Handed::Taken;
        }
        let mut store = |d: &mut Delivery| {
            if persist {
                d.store_seq = Some(inner.next_seq.fetch_add(1, Ordering::Relaxed));
                let ticket = batch.store_delivery(&self.client_id, d);
                let _ = update_flag(&self.stored_messages, true);
                ticket
            } else {
                d.store_seq = None;
                Ticket::NONE
            }
        };
        let mut slot = self.slot.lock();
        match &mut *slot {
            Slot::Online { mailbox } => {
                let limit = if force {
                    usize::MAX
                } else {
                    limit.min(self.capacity.load(Ordering::Relaxed))
                };
                match mailbox.push(delivery, limit, store) {
                    Ok(()) => Handed::Taken,
                    Err(d) => Handed::Full(d),
                }
            }
            Slot::Transferring { buffer, .. } if buffer.len() < limit => {
                // The batch's ticket covers the copy.
                let _ = store(&mut delivery);
                buffer.push(delivery);
                Handed::Taken
            }
            Slot::Transferring { .. } | Slot::Ended => Handed::Dropped,
            Slot::Offline { session, .. } => {
                // The sequence number goes with the message into the queue; it is stored
                // only if the queue took it.
                store_seq_only(&mut delivery, persist, &inner.next_seq);
                let queued = inner.enqueue(now, session, &delivery, Headed::Offline);
                if queued && persist {
                    // The batch's ticket covers it.
                    let _ = batch.store_delivery(&self.client_id, &delivery);
                    let _ = update_flag(&self.stored_messages, true);
                }
                if queued {
                    Handed::Taken
                } else {
                    Handed::Dropped
                }
            }
        }
    }
}

impl SessionHandle {
    /// What a connection's mailbox, or a session moving between connections, may hold.
    fn limit(inner: &Inner) -> usize {
        let config = &inner.config;
        config.max_queued_messages.max(1) + usize::from(config.max_inflight_messages)
    }

    /// Whether a delivery at `qos` would have to wait for room in this session now, as
    /// [`Inner::offer`] decides: a QoS 1 or 2 one while its queue or its connection's mailbox
    /// is full, a QoS 0 one while its connection's output is backed up; never for a session
    /// marked stalled (what is routed to it is dropped) nor for an offline one (its queue's
    /// own rules apply).
    pub(crate) fn lacks_room(&self, qos: QoS, inner: &Inner) -> bool {
        if self.stalled.load(Ordering::Relaxed) {
            return false;
        }
        if qos == QoS::AtMostOnce {
            return self.congested.load(Ordering::Relaxed);
        }
        if self.saturated.load(Ordering::Relaxed) {
            return true;
        }
        let limit = Self::limit(inner).min(self.capacity.load(Ordering::Relaxed));
        match &*self.slot.lock() {
            Slot::Online { mailbox } => mailbox.len() >= limit,
            _ => false,
        }
    }
}

fn store_seq_only(delivery: &mut Delivery, persist: bool, next: &AtomicU64) {
    delivery.store_seq = persist.then(|| next.fetch_add(1, Ordering::Relaxed));
}

/// The subscriptions a publication matches in one snapshot of the trie, less the publisher's
/// own No Local ones. A QoS 2 publication finds them once for both its room check
/// ([`Inner::lacking_room_in`]) and its routing ([`Inner::route_whole`]).
pub(crate) struct Matches<'t> {
    /// Direct subscriptions, sorted by session key.
    direct: SmallVec<[(u64, &'t Subscriber); 16]>,
    /// Shared subscription groups: one member of each gets the message.
    groups: SmallVec<[&'t SharedGroup<u64, Subscriber>; 4]>,
}

impl<'t> Matches<'t> {
    /// What `message`, published by session `from`, matches in `tree`.
    pub(crate) fn find(tree: &'t Tree, message: &Message, from: Option<u64>) -> Self {
        let mut direct: SmallVec<[(u64, &'t Subscriber); 16]> = SmallVec::new();
        let mut groups = SmallVec::new();
        tree.for_each_match(&message.topic, |m| match m {
            Match::Direct(key, sub) => {
                if !(sub.options.no_local && Some(*key) == from) {
                    direct.push((*key, sub));
                }
            }
            Match::Shared { members, .. } => groups.push(members),
        });
        direct.sort_unstable_by_key(|(k, _)| *k);
        Self { direct, groups }
    }

    /// The direct subscriptions grouped by session: a session gets one copy however many of
    /// its subscriptions match.
    fn by_session(&self) -> impl Iterator<Item = &[(u64, &'t Subscriber)]> {
        self.direct.chunk_by(|a, b| a.0 == b.0)
    }
}

/// Stores `value` only if it changed, so an unchanged flag costs other cores no cache traffic.
/// Returns whether it changed.
pub(crate) fn update_flag(flag: &AtomicBool, value: bool) -> bool {
    let changed = flag.load(Ordering::Relaxed) != value;
    if changed {
        flag.store(value, Ordering::Relaxed);
    }
    changed
}

impl SessionHandle {
    /// Records whether the session's queue is full; when it has room again, publishers
    /// waiting for it are woken.
    pub(crate) fn set_saturated(&self, saturated: bool) {
        if update_flag(&self.saturated, saturated) && !saturated {
            update_flag(&self.stalled, false);
            self.room.notify_waiters();
        }
    }

    /// Records that the connection wrote to its client: a session marked stalled is not
    /// stalled any more, and publishers waiting for its backed-up output see it move.
    pub(crate) fn wrote(&self, backed_up: bool) {
        if backed_up {
            self.progress.fetch_add(1, Ordering::Relaxed);
        }
        // Stalled means no progress at all. Were it to last until the output drains, the
        // publishers it no longer holds back could take the CPU the connection needs to drain
        // it, and the broker would read at full speed only to drop.
        if update_flag(&self.stalled, false) {
            self.room.notify_waiters();
        }
    }

    /// Records whether the connection's output is backed up; when it drains, publishers
    /// waiting to hand it QoS 0 messages are woken.
    pub(crate) fn set_congested(&self, congested: bool) {
        if update_flag(&self.congested, congested) && !congested {
            update_flag(&self.stalled, false);
            self.progress.fetch_add(1, Ordering::Relaxed);
            // One publisher at a time, in the order they started to wait: the first one
            // woken usually fills the output again, and waking them all would have the rest
            // find it backed up and go back to sleep.
            self.room.notify_one();
        }
    }
}

/// What became of a delivery handed to a session.
pub(crate) enum Handed {
    /// The session has it.
    Taken,
    /// The connection's mailbox is full: here it is back.
    Full(Delivery),
    /// Dropped.
    Dropped,
}

/// Where a session whose queue takes deliveries that waited for it is headed; decides what
/// happens to QoS 0 messages (see [`Inner::enqueue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Headed {
    /// To a connection (a client resumes it or takes it over), or to its end, where its
    /// queued shared-subscription messages go to other members of their groups.
    Online,
    /// Offline, held by the broker.
    Offline,
}

/// A session just parked offline: what its timer task needs.
struct Parked {
    generation: u64,
    /// Cancelled when the session leaves its offline slot.
    cancel: CancellationToken,
}

/// Counts a running session-timer task in [`Metrics::session_timers`] for as long as it lives,
/// however it ends.
struct TimerGauge(prometheus_client::metrics::gauge::Gauge);

impl TimerGauge {
    fn start(metrics: &Metrics) -> Self {
        metrics.session_timers.inc();
        Self(metrics.session_timers.clone())
    }
}

impl Drop for TimerGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The persistent sessions held, connected or not, against `max_sessions`.
///
/// A session counts from the moment a connection acquires it as persistent (or storage
/// restores it) until it ends, through the `counted` flag of its handle, so the count is
/// exact whatever path a session takes. A CONNECT that would add one first takes a
/// [`SessionPermit`]: taking it is what is refused past the limit, atomically, so that
/// concurrent CONNECTs cannot together pass it.
#[derive(Debug)]
pub(crate) struct SessionCount {
    held: AtomicUsize,
    /// 0 for no limit; a reload may change it (sessions held beyond a lowered limit stay).
    max: AtomicUsize,
}

/// One place under `max_sessions`, taken for a CONNECT that will create a persistent session.
/// Dropped unused (the CONNECT failed, or the session was counted already), it is given back.
#[derive(Debug)]
pub(crate) struct SessionPermit(Option<Arc<SessionCount>>);

impl Drop for SessionPermit {
    fn drop(&mut self) {
        if let Some(count) = self.0.take() {
            count.held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl SessionCount {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            held: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }

    /// The limit for places taken from now on.
    pub(crate) fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// The limit (0: none).
    pub(crate) fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Persistent sessions held now (places taken by permits included).
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// A place for one more persistent session, unless that would pass the limit.
    pub(crate) fn permit(self: &Arc<Self>) -> Option<SessionPermit> {
        let max = self.max();
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .ok()?;
        Some(SessionPermit(Some(self.clone())))
    }

    /// Counts `handle`'s session, with the place `permit` took if it has one; a session
    /// counted already gives the permit back.
    pub(crate) fn count(&self, handle: &SessionHandle, permit: Option<SessionPermit>) {
        if handle.counted.swap(true, Ordering::Relaxed) {
            return;
        }
        match permit {
            Some(mut permit) => {
                // Its place is now the session's.
                permit.0 = None;
            }
            None => {
                self.held.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// `handle`'s session ended: its place is free.
    pub(crate) fn uncount(&self, handle: &SessionHandle) {
        if handle.counted.swap(false, Ordering::Relaxed) {
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Deliveries waiting for room in their sessions' queues.
pub(crate) type Blocked = SmallVec<[(Arc<SessionHandle>, Delivery); 1]>;

/// Sessions a publication waits for room in.
pub(crate) type Waits = SmallVec<[Arc<SessionHandle>; 1]>;

/// The session a connection gets.
pub(crate) struct Acquired {
    pub(crate) handle: Arc<SessionHandle>,
    pub(crate) session: Session,
    pub(crate) present: bool,
    /// The CONNECT is refused with this reason instead (in a cluster: no quorum to claim
    /// the session).
    pub(crate) refused: Option<ReasonCode>,
}

/// Where a session is, as [`Inner::session_view`] saw it.
#[derive(Debug)]
pub(crate) enum SessionState {
    /// A connection serves it; `conn` is set once its CONNECT was accepted.
    Online(Arc<Mailbox>),
    /// Moving between connections.
    Transferring,
    /// No client is connected; the broker holds it since then.
    Offline { since: SystemTime },
}

/// One session at one moment, for the admin API: a copy, so no lock is held while it is
/// serialized.
#[derive(Debug)]
pub(crate) struct SessionView {
    pub(crate) client_id: ClientId,
    pub(crate) state: SessionState,
    /// Whether it outlives its connection.
    pub(crate) persistent: bool,
    /// Its expiry interval, while the broker holds it offline.
    pub(crate) expiry_interval: Option<u32>,
    pub(crate) queued: usize,
    pub(crate) in_flight: usize,
    /// How many subscriptions it has.
    pub(crate) subscription_count: usize,
    /// Its subscriptions, sorted by filter (empty unless asked for).
    pub(crate) subscriptions: Vec<(TopicFilter, SubscriptionOptions, Option<NonZeroU32>)>,
}

impl SessionView {
    /// What the connection's CONNECT settled, if a client is connected.
    pub(crate) fn conn(&self) -> Option<&ConnInfo> {
        match &self.state {
            SessionState::Online(mailbox) => mailbox.conn.get().map(|c| &**c),
            _ => None,
        }
    }

    /// The QUIC path figures of its connection, read now, if a QUIC or node client is
    /// connected.
    pub(crate) fn path(&self) -> Option<QuicPathView> {
        match &self.state {
            SessionState::Online(mailbox) if mailbox.conn.get().is_some() => {
                mailbox.path.get().and_then(|probe| (probe.0)())
            }
            _ => None,
        }
    }

    /// The connection's counters, if a client is connected.
    pub(crate) fn stats(&self) -> Option<&ConnStats> {
        match &self.state {
            SessionState::Online(mailbox) if mailbox.conn.get().is_some() => Some(&mailbox.stats),
            _ => None,
        }
    }
}

/// What came of an administrator's request to disconnect a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kick {
    /// Its connection was asked to close.
    Asked,
    /// The session exists but no accepted connection serves it.
    NotConnected,
    /// No such session.
    Unknown,
}

impl Inner {
    /// Every registered session, in no particular order.
    /// Counts a client accepted on `listener`.
    pub(crate) fn count_connection(&self, listener: &Arc<str>) {
        let mut totals = self.listener_totals.lock();
        totals.entry(listener.clone()).or_default().connections += 1;
    }

    /// Adds an ended connection's counters to its listener's totals. Called before the
    /// connection leaves the live view, so that a listing sees it in one place or the other.
    pub(crate) fn fold_connection(&self, listener: &Arc<str>, stats: &ConnStats) {
        let mut totals = self.listener_totals.lock();
        totals.entry(listener.clone()).or_default().add(stats);
        stats.folded.store(true, Ordering::Relaxed);
    }

    /// What each listener's clients did, by listener URL: the ended connections' totals
    /// (and the count of all it accepted) plus the counters so far of its live connections
    /// among `views`, each connection counted once; and how many of those are live. One pass
    /// over `views`, which must be taken before the call: a connection that ended since is
    /// then in the totals and marked folded (it folds before it leaves the live view), one
    /// that ended before is in the totals only.
    pub(crate) fn listener_figures(
        &self,
        views: &[SessionView],
    ) -> HashMap<Arc<str>, (ListenerTotals, usize)> {
        let totals = self.listener_totals.lock();
        let mut figures: HashMap<Arc<str>, (ListenerTotals, usize)> = totals
            .iter()
            .map(|(listener, t)| (listener.clone(), (*t, 0)))
            .collect();
        for view in views {
            let (Some(conn), Some(stats)) = (view.conn(), view.stats()) else {
                continue;
            };
            if !stats.folded.load(Ordering::Relaxed) {
                let (live, clients) = figures
                    .entry(conn.client.peer.listener.clone())
                    .or_default();
                live.add(stats);
                *clients += 1;
            }
        }
        drop(totals);
        figures
    }

    pub(crate) fn session_views(&self) -> Vec<SessionView> {
        // The handles first: no session's lock is taken under the registry's.
        let handles: Vec<Arc<SessionHandle>> =
            self.sessions.iter().map(|e| e.value().clone()).collect();
        handles
            .iter()
            .filter_map(|h| Self::view(h, false))
            .collect()
    }

    /// Every registered session with its subscriptions, in no particular order.
    pub(crate) fn detailed_session_views(&self) -> Vec<SessionView> {
        let handles: Vec<Arc<SessionHandle>> =
            self.sessions.iter().map(|e| e.value().clone()).collect();
        handles.iter().filter_map(|h| Self::view(h, true)).collect()
    }

    /// The session of `client_id`, with its subscriptions.
    pub(crate) fn session_view(&self, client_id: &ClientId) -> Option<SessionView> {
        let handle = self.sessions.get(client_id).map(|h| h.clone())?;
        Self::view(&handle, true)
    }

    /// The session behind `handle` now (`None` if it ended); its subscriptions if `detailed`,
    /// else only their number.
    fn view(handle: &SessionHandle, detailed: bool) -> Option<SessionView> {
        let (state, expiry_interval, queued, in_flight) = match &*handle.slot.lock() {
            Slot::Online { mailbox } => {
                let stats = &mailbox.stats;
                (
                    SessionState::Online(mailbox.clone()),
                    None,
                    stats.queued.load(Ordering::Relaxed) as usize,
                    stats.in_flight.load(Ordering::Relaxed) as usize,
                )
            }
            Slot::Transferring { buffer, .. } => {
                (SessionState::Transferring, None, buffer.len(), 0)
            }
            Slot::Offline { session, since, .. } => (
                SessionState::Offline { since: *since },
                Some(session.expiry_interval()),
                session.queued().len(),
                session.in_flight_len(),
            ),
            Slot::Ended => return None,
        };
        let (subscription_count, subscriptions) = {
            let subs = handle.subscriptions.lock();
            let mut all: Vec<_> = match detailed {
                true => subs
                    .iter()
                    .map(|(f, (options, id))| (f.clone(), *options, *id))
                    .collect(),
                false => Vec::new(),
            };
            all.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
            (subs.len(), all)
        };
        Some(SessionView {
            client_id: handle.client_id.clone(),
            state,
            persistent: handle.persistent.load(Ordering::Relaxed),
            expiry_interval,
            queued,
            in_flight,
            subscription_count,
            subscriptions,
        })
    }

    /// Asks the connection serving `client_id` to close as an administrative action:
    /// DISCONNECT 0x98 for an MQTT 5 client, a plain close for an earlier one. Its session
    /// then goes where its expiry interval says, as after any DISCONNECT.
    pub(crate) fn kick(&self, client_id: &ClientId) -> Kick {
        let Some(handle) = self.sessions.get(client_id).map(|h| h.clone()) else {
            return Kick::Unknown;
        };
        let slot = handle.slot.lock();
        match &*slot {
            Slot::Online { mailbox } if mailbox.conn.get().is_some() => {
                mailbox.kick(ReasonCode::AdministrativeAction);
                Kick::Asked
            }
            Slot::Ended => Kick::Unknown,
            _ => Kick::NotConnected,
        }
    }

    /// Ends the session of `client_id` that the broker holds offline, as its expiry would: a
    /// pending will is published, its subscriptions and queued messages go, storage forgets
    /// it. A session with a connection is left alone ([`Discard::Connected`]: kick it first).
    pub(crate) fn discard_session(&self, now: Instant, client_id: &ClientId) -> Discard {
        let Some(handle) = self.sessions.get(client_id).map(|h| h.clone()) else {
            return Discard::Unknown;
        };
        let session = {
            let mut slot = handle.slot.lock();
            match &*slot {
                Slot::Offline { .. } => {}
                Slot::Ended => return Discard::Unknown,
                _ => return Discard::Connected,
            }
            // Dropping the offline slot stops the session's timer task.
            match std::mem::replace(&mut *slot, Slot::Ended) {
                Slot::Offline { session, .. } => *session,
                _ => return Discard::Unknown,
            }
        };
        self.end_session(now, &handle, Some(session));
        Discard::Done
    }
}

/// What came of an administrator's request to end an offline session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Discard {
    /// It ended.
    Done,
    /// A connection serves it (or is taking it over).
    Connected,
    /// No such session.
    Unknown,
}

/// The shared broker state.
pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(crate) server_config: Arc<ServerConfig>,
    subscriptions: ArcSwap<Tree>,
    subscription_writer: Mutex<()>,
    pub(crate) sessions: DashMap<ClientId, Arc<SessionHandle>>,
    pub(crate) retained: RetainedStore,
    /// Persistent sessions held, against `max_sessions`.
    pub(crate) persistent_sessions: Arc<SessionCount>,
    pub(crate) hooks: Arc<dyn Hooks>,
    pub(crate) auth: ArcSwap<AccessControl>,
    pub(crate) scram: ScramServer,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
    pub(crate) started: Instant,
    next_key: AtomicU64,
    next_generation: AtomicU64,
    /// The next [`Delivery::store_seq`].
    pub(crate) next_seq: AtomicU64,
    /// Whether acknowledgements wait for storage (see [`Storage::is_durable`]).
    pub(crate) durable: bool,
    id_seed: u64,
    /// The bridges running (a reload changes them).
    pub(crate) bridges: crate::bridge::Bridges,
    /// The peer-to-peer links open now, for the admin API.
    #[cfg(feature = "p2p")]
    pub(crate) peers: Arc<crate::peers::PeerLinks>,
    /// `p2p.use_node_id_as_username`, which a reload changes.
    pub(crate) node_id_as_username: AtomicBool,
    /// The admin API's keys and failed-attempt limiter.
    pub(crate) api: crate::api::ApiState,
    /// The listeners with their bound addresses, once all are bound.
    pub(crate) listeners: std::sync::OnceLock<Vec<(crate::config::Listener, std::net::SocketAddr)>>,
    /// What a reload replaces, once the broker has started.
    pub(crate) reloader: std::sync::OnceLock<crate::reload::Reloader>,
    /// This broker's cluster node, set at start when `[cluster]` is configured.
    pub(crate) cluster: std::sync::OnceLock<Arc<crate::cluster::BrokerCluster>>,
    /// The limits a reload may change; read here, not in `config`.
    pub(crate) limits: ArcSwap<LiveLimits>,
    /// The configuration as last loaded: at start, then by each successful reload (`config`
    /// stays the one the broker started with, which settings that need a restart follow).
    pub(crate) loaded_config: ArcSwap<Config>,
    /// What each listener's ended connections did, by listener URL (see [`ListenerTotals`]).
    listener_totals: Mutex<HashMap<Arc<str>, ListenerTotals>>,
    /// The cluster's routes and forwarding, once attached (see `forwarding.rs`).
    router: std::sync::OnceLock<mqttd_cluster::Router>,
    /// In a cluster: the storage that sends persistent sessions to Raft (see
    /// `cluster_sessions.rs`), and the lock under which effects of applied entries and a
    /// claim's reading of the replicated session take turns.
    pub(crate) cluster_storage: std::sync::OnceLock<Arc<crate::cluster_storage::ClusterStorage>>,
    pub(crate) cluster_apply: Mutex<()>,
}

/// What a listener's clients did over the broker's life, for the admin API. A connection
/// adds its counters once, when it ends (live connections are added when asked), so the
/// busy path pays nothing for it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListenerTotals {
    /// Clients whose CONNECT it accepted.
    pub(crate) connections: u64,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) messages_in: u64,
    pub(crate) messages_out: u64,
}

impl ListenerTotals {
    /// Adds a connection's counters.
    pub(crate) fn add(&mut self, stats: &ConnStats) {
        self.bytes_in += stats.bytes_in.load(Ordering::Relaxed);
        self.bytes_out += stats.bytes_out.load(Ordering::Relaxed);
        self.messages_in += stats.messages_in.load(Ordering::Relaxed);
        self.messages_out += stats.messages_out.load(Ordering::Relaxed);
    }
}

/// The limits a reload applies at once (the other settings wait for a restart): each is read
/// where it is checked, for the operations that come next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LiveLimits {
    /// `max_retained_messages`.
    pub(crate) max_retained_messages: usize,
    /// `max_retained_bytes`.
    pub(crate) max_retained_bytes: usize,
    /// `max_subscriptions` (per session; 0: none).
    pub(crate) max_subscriptions: usize,
    /// `max_connection_rate` (new connections per second and source; 0: none).
    pub(crate) max_connection_rate: u32,
    /// `max_topic_length` (bytes of a topic name or filter).
    pub(crate) max_topic_length: usize,
    /// `max_topic_levels` (levels of a topic name or filter).
    pub(crate) max_topic_levels: usize,
}

impl LiveLimits {
    pub(crate) fn of(config: &Config) -> Self {
        Self {
            max_retained_messages: config.max_retained_messages,
            max_retained_bytes: config.max_retained_bytes,
            max_subscriptions: config.max_subscriptions,
            max_connection_rate: config.max_connection_rate,
            max_topic_length: config.max_topic_length,
            max_topic_levels: config.max_topic_levels,
        }
    }
}

impl Inner {
    pub(crate) fn new(
        config: Config,
        hooks: Arc<dyn Hooks>,
        auth: AccessControl,
        scram: ScramServer,
        storage: Arc<dyn Storage>,
    ) -> Self {
        let server_config = config.server_config();
        let durable = storage.is_durable();
        let node_id_as_username = config.p2p.use_node_id_as_username.into();
        let persistent_sessions = Arc::new(SessionCount::new(config.max_sessions));
        Self {
            api: crate::api::ApiState::new(&config.data_dir),
            listeners: std::sync::OnceLock::new(),
            reloader: std::sync::OnceLock::new(),
            cluster: std::sync::OnceLock::new(),
            limits: ArcSwap::from_pointee(LiveLimits::of(&config)),
            loaded_config: ArcSwap::from_pointee(config.clone()),
            listener_totals: Mutex::new(HashMap::new()),
            router: std::sync::OnceLock::new(),
            cluster_storage: std::sync::OnceLock::new(),
            cluster_apply: Mutex::new(()),
            bridges: crate::bridge::Bridges::default(),
            #[cfg(feature = "p2p")]
            peers: Arc::default(),
            node_id_as_username,
            config,
            server_config: Arc::new(server_config),
            subscriptions: ArcSwap::from_pointee(Tree::new()),
            subscription_writer: Mutex::new(()),
            sessions: DashMap::new(),
            retained: RetainedStore::new(),
            persistent_sessions,
            hooks,
            auth: ArcSwap::from_pointee(auth),
            scram,
            storage,
            metrics: Metrics::default(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            started: crate::clock::now(),
            next_key: AtomicU64::new(1),
            next_generation: AtomicU64::new(1),
            next_seq: AtomicU64::new(1),
            durable,
            id_seed: std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
        }
    }

    /// Authenticates a CONNECT: the hooks first, then the built-in rules.
    pub(crate) fn authenticate(&self, attempt: &ConnectAttempt<'_>) -> Result<(), ReasonCode> {
        match self.hooks.authenticate(attempt) {
            Verdict::Allow => Ok(()),
            Verdict::Deny(reason) => Err(reason),
            Verdict::Defer => self.auth.load().authenticate(attempt),
        }
    }

    /// Authorizes a topic action: the hooks first, then the ACL. A bridge's own session is
    /// trusted: it is configured by whoever configures the broker.
    pub(crate) fn authorize(&self, client: &ClientInfo, action: Action, topic: &str) -> bool {
        if client.peer.transport == Transport::Bridge {
            return true;
        }
        match self.hooks.authorize(client, action, topic) {
            Verdict::Allow => true,
            Verdict::Deny(_) => false,
            Verdict::Defer => self.auth.load().authorize(client, action, topic),
        }
    }

    /// A client identifier for a client that sent an empty one.
    pub(crate) fn assign_client_id(&self) -> ClientId {
        let n = self.next_key.fetch_add(1, Ordering::Relaxed);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(self.id_seed ^ n);
        ClientId::try_from(format!("mqttd-{:016x}{:08x}", h.finish(), n as u32)).unwrap_or_default()
    }

    /// Brings the gauges that are cheaper to read than to maintain up to date.
    pub(crate) fn refresh_gauges(&self) {
        let m = &self.metrics;
        m.sessions.set(self.sessions.len() as i64);
        m.subscriptions.set(self.subscriptions.load().len() as i64);
        m.retained_messages.set(self.retained.len() as i64);
        m.retained_bytes
            .set(i64::try_from(self.retained.bytes()).unwrap_or(i64::MAX));
        m.persistent_sessions
            .set(i64::try_from(self.persistent_sessions.held()).unwrap_or(i64::MAX));
        if let Some(cluster) = self.cluster.get() {
            let node = cluster.node();
            m.set_forwarding(&node.router().stats(), node.id());
        }
        for name in self.bridges.names() {
            let held = self.held_by(&crate::bridge::config::local_client_id(&name));
            m.bridge(&name)
                .queued
                .set(i64::try_from(held).unwrap_or(i64::MAX));
        }
    }

    /// Messages the session of `client_id` holds for its client: queued and in flight.
    fn held_by(&self, client_id: &ClientId) -> usize {
        let Some(handle) = self.sessions.get(client_id).map(|h| h.clone()) else {
            return 0;
        };
        let slot = handle.slot.lock();
        match &*slot {
            Slot::Online { .. } => handle.backlog.load(Ordering::Relaxed),
            Slot::Offline { session, .. } => session.queued().len() + session.in_flight_len(),
            Slot::Transferring { buffer, .. } => buffer.len(),
            Slot::Ended => 0,
        }
    }

    pub(crate) fn new_handle(&self, client_id: &ClientId, slot: Slot) -> Arc<SessionHandle> {
        Arc::new(SessionHandle {
            key: self.next_key.fetch_add(1, Ordering::Relaxed),
            client_id: client_id.clone(),
            slot: Mutex::new(slot),
            subscriptions: Mutex::new(Subscriptions::default()),
            congested: AtomicBool::new(false),
            saturated: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            room: Notify::new(),
            capacity: AtomicUsize::new(usize::MAX),
            progress: AtomicU64::new(0),
            persistent: AtomicBool::new(false),
            counted: AtomicBool::new(false),
            stored: AtomicBool::new(false),
            stored_messages: AtomicBool::new(false),
            backlog: AtomicUsize::new(0),
        })
    }

    /// Removes what storage holds of a session.
    fn forget_stored(&self, handle: &SessionHandle) -> Ticket {
        let mut ticket = Ticket::NONE;
        if handle.stored.swap(false, Ordering::Relaxed) {
            ticket.merge(self.storage.remove_session(&handle.client_id));
        }
        if handle.stored_messages.swap(false, Ordering::Relaxed) {
            ticket.merge(self.storage.remove_messages(&handle.client_id));
        }
        ticket
    }

    /// A stored delivery that will not be delivered after all: forget it.
    pub(crate) fn discard(&self, client_id: &ClientId, delivery: &Delivery) -> Ticket {
        if delivery.store_seq.is_some() {
            self.storage.delivery_done(client_id, delivery)
        } else {
            Ticket::NONE
        }
    }

    /// Queues `delivery` in `session`, which no connection serves right now, headed where
    /// `headed` says. The one policy for every path that fills such a queue: a QoS 0 message
    /// enters the queue of an offline session only with `offline_qos0 = "queue"`, and the
    /// session's bounds apply. Returns whether it was queued.
    pub(crate) fn enqueue(
        &self,
        now: Instant,
        session: &mut Session,
        delivery: &Delivery,
        headed: Headed,
    ) -> bool {
        let offline_drop = headed == Headed::Offline
            && delivery.qos == QoS::AtMostOnce
            && self.config.offline_qos0 != OfflineQos0::Queue;
        !offline_drop
            && matches!(
                session.enqueue(now, delivery.clone()),
                Enqueued::Queued | Enqueued::Sent
            )
    }

    /// Queues in `session` what waited for it, in order, with [`Inner::enqueue`]; what it
    /// does not take (all of it without a session) is dropped, and forgotten if stored.
    pub(crate) fn enqueue_all(
        &self,
        now: Instant,
        client_id: &ClientId,
        mut session: Option<&mut Session>,
        waiting: impl IntoIterator<Item = Delivery>,
        headed: Headed,
    ) {
        for d in waiting {
            let queued = session
                .as_deref_mut()
                .is_some_and(|s| self.enqueue(now, s, &d, headed));
            if !queued {
                self.metrics.messages_dropped.inc();
                // Nothing is sent that depends on forgetting a dropped message.
                let _ = self.discard(client_id, &d);
            }
        }
    }

    /// Answers a connection core's [`crate::core::Request::AcquireSession`].
    pub(crate) async fn acquire(
        &self,
        now: Instant,
        request: &crate::core::SessionRequest,
        mailbox: &Arc<Mailbox>,
    ) -> Acquired {
        if let Some(cluster) = self.cluster.get() {
            if cluster.refuses_clients() {
                tracing::info!(client_id = %request.client_id, "cut off from the cluster's quorum: CONNECT refused");
                return self.refused(
                    &request.client_id,
                    request.expiry,
                    ReasonCode::ServerUnavailable,
                );
            }
        }
        if request.expiry > 0 {
            if let Some(storage) = self.cluster_storage.get() {
                return self
                    .acquire_in_cluster(now, request, mailbox, storage)
                    .await;
            }
        }
        self.acquire_session(
            now,
            &request.client_id,
            request.clean_start,
            request.expiry,
            mailbox,
        )
        .await
    }

    /// Shared state for unit tests: `config` with anonymous access allowed, on `storage`.
    #[cfg(test)]
    pub(crate) fn for_tests(config: Config, storage: Arc<dyn Storage>) -> Arc<Self> {
        let access = AccessControl {
            anonymous: true,
            ..AccessControl::default()
        };
        Arc::new(Self::new(
            config,
            Arc::new(crate::hooks::NoHooks),
            access,
            ScramServer::new([0; 32]),
            storage,
        ))
    }

    /// Finds or creates the session for a connecting client, taking it over from another
    /// connection if needed. On clean start an existing session ends (and its will is
    /// published).
    pub(crate) async fn acquire_session(
        &self,
        now: Instant,
        client_id: &ClientId,
        clean_start: bool,
        expiry: u32,
        mailbox: &Arc<Mailbox>,
    ) -> Acquired {
        let online = || Slot::Online {
            mailbox: mailbox.clone(),
        };
        let fresh = || Session::new(client_id.clone(), expiry, self.config.queue_limits());
        for _ in 0..100 {
            let existing = match self.sessions.entry(client_id.clone()) {
                dashmap::mapref::entry::Entry::Vacant(v) => {
                    let handle = self.new_handle(client_id, online());
                    v.insert(handle.clone());
                    return Acquired {
                        handle,
                        session: fresh(),
                        present: false,
                        refused: None,
                    };
                }
                dashmap::mapref::entry::Entry::Occupied(o) => o.get().clone(),
            };
            enum Taken {
                Now(Box<Session>),
                Later(oneshot::Receiver<Option<Session>>),
                Busy,
                Gone,
            }
            let taken = {
                let mut slot = existing.slot.lock();
                let moving = Slot::Transferring {
                    buffer: Vec::new(),
                    from: None,
                };
                match std::mem::replace(&mut *slot, moving) {
                    Slot::Online { mailbox } => {
                        let (tx, rx) = oneshot::channel();
                        mailbox.take_over(SessionReply(tx));
                        *slot = Slot::Transferring {
                            buffer: Vec::new(),
                            from: Some(mailbox),
                        };
                        Taken::Later(rx)
                    }
                    Slot::Offline { session, .. } => Taken::Now(session),
                    busy @ Slot::Transferring { .. } => {
                        *slot = busy;
                        Taken::Busy
                    }
                    Slot::Ended => {
                        *slot = Slot::Ended;
                        Taken::Gone
                    }
                }
            };
            let old = match taken {
                Taken::Now(session) => Some(*session),
                Taken::Later(mut rx) => {
                    self.metrics.takeovers.inc();
                    match tokio::time::timeout(TAKEOVER_TIMEOUT, &mut rx).await {
                        Ok(answer) => answer.ok().flatten(),
                        Err(_) => {
                            // No answer yet (the old connection's process was paused, or it
                            // is stuck writing to its client): the session is still the old
                            // connection's, which keeps it once it sees nobody waits (what
                            // it sent before the close below is taken). This client is
                            // refused and connects again; nothing of the session is lost.
                            rx.close();
                            match rx.try_recv() {
                                Ok(answer) => answer,
                                Err(_) => {
                                    return self.refused(client_id, expiry, ReasonCode::ServerBusy)
                                }
                            }
                        }
                    }
                }
                Taken::Busy => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Taken::Gone => {
                    self.sessions
                        .remove_if(client_id, |_, h| Arc::ptr_eq(h, &existing));
                    continue;
                }
            };
            let Some(mut old) = old else {
                // The old connection vanished without its session: start afresh.
                self.end_session(now, &existing, None);
                continue;
            };
            // After the wait above, `now` may predate the old connection's close.
            let now = now.max(crate::clock::now());
            // A session whose expiry interval is zero ended with its connection (MQTT 5.0
            // 3.1.2.11.2; a 3.1.1 clean session): one taken over from a connection that has just
            // closed, by DISCONNECT or by this takeover, is not resumed. Ending it publishes
            // its will.
            if clean_start || old.expiry_interval() == 0 {
                self.end_session(now, &existing, Some(old));
                continue;
            }
            match old.handle_timeout(now) {
                // A will whose delay is zero is due now that the old connection closed.
                Some(SessionEvent::WillDue(will)) => self.publish_will(now, will),
                // Expired before its timer ran (the broker was busy): it is over, its will is
                // due, and the client starts afresh.
                Some(SessionEvent::Expired { will }) => {
                    if let Some(will) = will {
                        self.publish_will(now, will);
                    }
                    self.end_session(now, &existing, Some(old));
                    continue;
                }
                None => {}
            }
            let mut slot = existing.slot.lock();
            match std::mem::replace(&mut *slot, online()) {
                Slot::Transferring { buffer, .. } => {
                    self.enqueue_all(now, client_id, Some(&mut old), buffer, Headed::Online);
                }
                // Ended while it moved (another node of the cluster took it): not resumed.
                other => {
                    *slot = other;
                    continue;
                }
            }
            drop(slot);
            old.set_expiry_interval(expiry);
            return Acquired {
                handle: existing,
                session: old,
                present: true,
                refused: None,
            };
        }
        // Persistent contention for one client id (or a session that stays in transfer): this
        // client is refused, rather than blocked forever or given a session that is not the
        // one it asked for.
        self.refused(client_id, expiry, ReasonCode::ServerBusy)
    }

    /// A CONNECT refused with `reason` (return code 3, server unavailable, for MQTT 3.1.1):
    /// 0x89 server busy when its session could not be had from the connection that holds
    /// it, 0x88 server unavailable when the cluster cannot serve it.
    pub(crate) fn refused(
        &self,
        client_id: &ClientId,
        expiry: u32,
        reason: ReasonCode,
    ) -> Acquired {
        Acquired {
            handle: self.new_handle(client_id, Slot::Ended),
            session: Session::new(client_id.clone(), expiry, self.config.queue_limits()),
            present: false,
            refused: Some(reason),
        }
    }

    /// Asks every connected client's connection to close with `reason`; returns how many.
    pub(crate) fn disconnect_all(&self, reason: ReasonCode) -> usize {
        let mut count = 0;
        for handle in self.sessions.iter() {
            if let Slot::Online { mailbox } = &*handle.slot.lock() {
                if mailbox.conn.get().is_some() {
                    mailbox.kick(reason);
                    count += 1;
                }
            }
        }
        count
    }

    /// Ends a session: publishes its pending will, removes its subscriptions and forgets it.
    pub(crate) fn end_session(
        &self,
        now: Instant,
        handle: &Arc<SessionHandle>,
        session: Option<Session>,
    ) {
        *handle.slot.lock() = Slot::Ended;
        self.sessions
            .remove_if(&handle.client_id, |_, h| Arc::ptr_eq(h, handle));
        self.release_session(handle);
        // Nothing this session's client is sent depends on it any more; a client that
        // starts afresh under its identifier waits for its own, later changes.
        let _ = self.forget_stored(handle);
        let Some(mut session) = session else { return };
        // Messages this session got through a shared subscription and never acknowledged go
        // to another member of the group.
        let unacknowledged: Vec<Delivery> = session
            .in_flight()
            .filter(|(_, f)| f.state == OutboundState::PublishSent)
            .map(|(_, f)| f.delivery.clone())
            .chain(session.queued().cloned())
            .filter(|d| d.shared.is_some())
            .collect();
        for delivery in unacknowledged {
            self.reroute_shared(now, delivery, handle.key);
        }
        if let Some(will) = session.end(now) {
            self.publish_will(now, will);
        }
    }

    /// What a session that is over here gives back: its count and its subscriptions.
    pub(crate) fn release_session(&self, handle: &SessionHandle) {
        self.persistent_sessions.uncount(handle);
        let filters: Vec<TopicFilter> = handle
            .subscriptions
            .lock()
            .drain()
            .map(|(f, _)| f)
            .collect();
        self.unsubscribe_all(handle.key, &filters);
    }

    /// Hands a shared-subscription message to another member of its group, if one is left.
    fn reroute_shared(&self, now: Instant, mut delivery: Delivery, from: u64) {
        let Some(filter) = delivery.shared.clone() else {
            return;
        };
        let tree = self.subscriptions.load();
        let Some(group) = tree.shared_group(&filter) else {
            return;
        };
        let chosen = group.pick(|k, s| *k != from && !matches!(*s.handle.slot.lock(), Slot::Ended));
        if let Some((_, sub)) = chosen {
            delivery.qos = delivery.message.qos.min(sub.options.qos);
            delivery.retain = false;
            delivery.store_seq = None;
            if !sub.handle.deliver(now, delivery, self) {
                self.metrics.messages_dropped.inc();
            }
        }
    }

    /// What a connection that closed leaves of its session, which no other connection is
    /// taking over: a session with an expiry interval is stored and held offline, with the
    /// stored messages that were `waiting` for it; any other ends (its will published).
    pub(crate) fn keep_or_end(
        self: &Arc<Self>,
        now: Instant,
        since: SystemTime,
        handle: &Arc<SessionHandle>,
        session: Option<Session>,
        waiting: Vec<Delivery>,
    ) {
        let id = &handle.client_id;
        match session {
            Some(mut s) if s.expiry_interval() > 0 => {
                self.enqueue_all(now, id, Some(&mut s), waiting, Headed::Offline);
                // DISCONNECT may have changed the expiry; the will, if any, now waits for its
                // delay.
                let will = s.pending_will().map(|(will, due)| StoredWill {
                    will: will.clone(),
                    delay: due.saturating_duration_since(now).as_secs_f64().ceil() as u32,
                });
                // The connection is gone: nothing it sends waits for the record.
                let _ = self.save_session(handle, s.expiry_interval(), will, Some(since));
                self.park_session(now, handle, s, since);
            }
            mut s => {
                self.enqueue_all(now, id, s.as_mut(), waiting, Headed::Online);
                self.end_session(now, handle, s)
            }
        }
    }

    /// Stores a session whose connection closed at `since`, and runs its timers.
    pub(crate) fn park_session(
        self: &Arc<Self>,
        now: Instant,
        handle: &Arc<SessionHandle>,
        session: Session,
        since: SystemTime,
    ) {
        let parked = self.hold_session(now, handle, session, since);
        self.start_session_timers(now, handle, parked);
    }

    /// Puts a session whose connection closed in its slot; returns what its timers need.
    fn hold_session(
        &self,
        now: Instant,
        handle: &Arc<SessionHandle>,
        mut session: Session,
        since: SystemTime,
    ) -> Parked {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let mut slot = handle.slot.lock();
        // Messages routed while the connection was closing waited in the slot.
        if let Slot::Transferring { buffer, .. } = std::mem::replace(&mut *slot, Slot::Ended) {
            self.enqueue_all(
                now,
                &handle.client_id,
                Some(&mut session),
                buffer,
                Headed::Offline,
            );
        }
        *slot = Slot::Offline {
            session: Box::new(session),
            generation,
            since,
            _timers: cancel.clone().drop_guard(),
        };
        Parked { generation, cancel }
    }

    /// Runs an offline session's timers now and whenever they are due, in a task that ends
    /// when the session leaves the offline slot it was parked in.
    fn start_session_timers(
        self: &Arc<Self>,
        now: Instant,
        handle: &Arc<SessionHandle>,
        parked: Parked,
    ) {
        let Parked { generation, cancel } = parked;
        if let Some(next) = self.run_session_timers(now, handle, generation) {
            let inner = self.clone();
            let handle = handle.clone();
            let running = TimerGauge::start(&self.metrics);
            self.tasks.spawn(async move {
                let _running = running;
                let mut due = next;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due.into()) => {}
                        _ = cancel.cancelled() => return,
                        _ = inner.shutdown.cancelled() => return,
                    }
                    match inner.run_session_timers(crate::clock::now(), &handle, generation) {
                        Some(next) => due = next,
                        None => return,
                    }
                }
            });
        }
    }

    /// Fires a parked session's due timers; returns when to look again, if ever.
    fn run_session_timers(
        &self,
        now: Instant,
        handle: &Arc<SessionHandle>,
        generation: u64,
    ) -> Option<Instant> {
        loop {
            let mut slot = handle.slot.lock();
            let Slot::Offline {
                session,
                generation: g,
                since,
                ..
            } = &mut *slot
            else {
                return None;
            };
            if *g != generation {
                return None;
            }
            match session.handle_timeout(now) {
                Some(SessionEvent::WillDue(will)) => {
                    let expiry = session.expiry_interval();
                    let since = *since;
                    drop(slot);
                    // Stored without its will first, so that a restart does not publish it
                    // twice.
                    // Nothing waits for the record of a session without a connection.
                    let _ = self.save_session(handle, expiry, None, Some(since));
                    self.publish_will(now, will);
                }
                Some(SessionEvent::Expired { will }) => {
                    drop(slot);
                    self.end_session(now, handle, None);
                    if let Some(will) = will {
                        self.publish_will(now, will);
                    }
                    return None;
                }
                None => return session.poll_timeout(),
            }
        }
    }

    /// Publishes a will (the session's client is gone): retained if it says so, and routed.
    pub(crate) fn publish_will(&self, now: Instant, will: Message) {
        self.metrics.wills.inc();
        let will = Arc::new(will);
        let mut batch = Batch::direct(&*self.storage);
        if will.retain && self.config.retain_available {
            // Past the retained limits a will is still published, only not retained.
            if let Err(refused) = self.retain(&will, &mut batch) {
                self.metrics.limit_refused(refused.label(), 1);
            }
        }
        self.route_in(now, &will, None, &mut batch);
        // Nobody acknowledges a will: nothing waits for what publishing it stored, but the
        // sessions that got stored copies, which wait for their own.
        let _ = batch.commit();
    }

    /// Stores a retained message (an empty payload deletes), in memory and, through `batch`,
    /// in storage, unless the store would pass `max_retained_messages` or
    /// `max_retained_bytes`: then nothing is stored and the caller counts the refusal.
    pub(crate) fn retain(
        &self,
        message: &Arc<Message>,
        batch: &mut Batch<'_>,
    ) -> Result<(), RetainRefused> {
        let live = self.limits.load();
        let limits = RetainLimits {
            max_messages: live.max_retained_messages,
            max_bytes: live.max_retained_bytes,
        };
        self.retained.set_within(message.clone(), limits)?;
        // The batch's ticket covers it.
        let _ = batch.retain(message);
        Ok(())
    }

    /// Records a session in storage: a persistent one with its subscriptions, or one that
    /// ends with its connection only while it has a will to publish if the broker crashes.
    /// Returns the ticket of what it recorded.
    pub(crate) fn save_session(
        &self,
        handle: &SessionHandle,
        expiry_interval: u32,
        will: Option<StoredWill>,
        disconnected_at: Option<SystemTime>,
    ) -> Ticket {
        if expiry_interval == 0 && will.is_none() {
            return self.forget_stored(handle);
        }
        let _ = update_flag(&handle.stored, true);
        let subscriptions = handle
            .subscriptions
            .lock()
            .iter()
            .map(|(f, (options, id))| (f.clone(), *options, *id))
            .collect();
        let record = SessionRecord {
            client_id: handle.client_id.clone(),
            expiry_interval,
            subscriptions,
            will,
            disconnected_at,
        };
        self.storage.save_session(&record)
    }

    /// Restores what storage kept: sessions go offline with their subscriptions, messages and
    /// QoS 2 state; a connection the broker lost when it stopped counts as lost then, so will
    /// delays and session expiry run from that moment. Timers start only once every session
    /// is back, so that a will reaches the sessions restored after its own.
    pub(crate) fn restore_sessions(self: &Arc<Self>, recovered: Recovered) {
        let clock = Clock::now();
        let now = clock.instant;
        self.next_seq
            .fetch_max(recovered.next_seq.max(1), Ordering::Relaxed);
        let mut held = Vec::with_capacity(recovered.sessions.len());
        for stored in recovered.sessions {
            let record = stored.record;
            let mut session = Session::new(
                record.client_id.clone(),
                record.expiry_interval,
                self.config.queue_limits(),
            );
            let handle = self.new_handle(&record.client_id, Slot::Ended);
            handle.stored.store(true, Ordering::Relaxed);
            handle.stored_messages.store(true, Ordering::Relaxed);
            handle
                .persistent
                .store(record.expiry_interval > 0, Ordering::Relaxed);
            if record.expiry_interval > 0 {
                // What storage kept is held whatever the limit says now.
                self.persistent_sessions.count(&handle, None);
            }
            for StoredDelivery { delivery, flow } in stored.deliveries {
                match flow {
                    Some((packet_id, state)) => {
                        session.restore_in_flight(packet_id, delivery, state)
                    }
                    None => self.enqueue_all(
                        now,
                        &record.client_id,
                        Some(&mut session),
                        [delivery],
                        Headed::Offline,
                    ),
                }
            }
            for packet_id in stored.pending_releases {
                session.restore_pending_release(packet_id);
            }
            let since = record
                .disconnected_at
                .or(recovered.crashed_at)
                .unwrap_or(clock.system);
            session.disconnected(
                clock.to_instant(record::millis(since)),
                record.will.map(|w| (w.will, w.delay)),
            );
            self.restore_subscriptions(&handle, record.subscriptions);
            self.sessions.insert(record.client_id, handle.clone());
            held.push((handle, session, since));
        }
        let held: Vec<_> = held
            .into_iter()
            .map(|(handle, session, since)| {
                let parked = self.hold_session(now, &handle, session, since);
                (handle, parked)
            })
            .collect();
        for (handle, parked) in held {
            self.start_session_timers(now, &handle, parked);
        }
    }

    /// Puts back the subscriptions of a session restored from storage (the local store's,
    /// or the cluster's): into the trie, and into the session's own list.
    pub(crate) fn restore_subscriptions(
        &self,
        handle: &Arc<SessionHandle>,
        subscriptions: impl IntoIterator<Item = (TopicFilter, SubscriptionOptions, Option<NonZeroU32>)>,
    ) {
        let subs: Vec<(TopicFilter, Subscriber)> = subscriptions
            .into_iter()
            .map(|(filter, options, id)| {
                let shared = filter.share().is_some().then(|| filter.clone());
                (
                    filter,
                    Subscriber {
                        handle: handle.clone(),
                        options,
                        id,
                        shared,
                    },
                )
            })
            .collect();
        self.subscribe(&subs);
        let mut own = handle.subscriptions.lock();
        for (filter, sub) in subs {
            own.insert(filter, (sub.options, sub.id));
        }
    }

    /// Adds subscriptions to the trie in one snapshot; returns, per subscription, whether it
    /// already existed.
    pub(crate) fn subscribe(&self, subs: &[(TopicFilter, Subscriber)]) -> Vec<bool> {
        // A SUBSCRIBE refused whole (past `max_subscriptions`) publishes no new snapshot.
        if subs.is_empty() {
            return Vec::new();
        }
        let _writer = self.subscription_writer.lock();
        let mut tree = Tree::clone(&self.subscriptions.load());
        let existed: Vec<bool> = subs
            .iter()
            .map(|(filter, sub)| tree.insert(filter, sub.handle.key, sub.clone()).is_some())
            .collect();
        self.subscriptions.store(Arc::new(tree));
        if let Some(router) = self.router.get() {
            // One count per (session, filter), like the trie's entries.
            for ((filter, _), existed) in subs.iter().zip(&existed) {
                if !existed {
                    router.subscribe(filter.as_str());
                }
            }
        }
        existed
    }

    /// Removes subscriptions from the trie in one snapshot; returns which existed.
    pub(crate) fn unsubscribe_all(&self, key: u64, filters: &[TopicFilter]) -> Vec<bool> {
        if filters.is_empty() {
            return Vec::new();
        }
        let _writer = self.subscription_writer.lock();
        let mut tree = Tree::clone(&self.subscriptions.load());
        let existed: Vec<bool> = filters
            .iter()
            .map(|f| tree.remove(f, &key).is_some())
            .collect();
        self.subscriptions.store(Arc::new(tree));
        if let Some(router) = self.router.get() {
            for (filter, existed) in filters.iter().zip(&existed) {
                if *existed {
                    router.unsubscribe(filter.as_str());
                }
            }
        }
        existed
    }

    /// Attaches the cluster's router (see `forwarding::attach`): the subscriptions held now
    /// are announced, later ones as they come. Returns false if one was attached already.
    pub(crate) fn attach_router(&self, router: mqttd_cluster::Router) -> bool {
        // Under the writer's lock, no subscription changes between the replay and the hook.
        let _writer = self.subscription_writer.lock();
        if self.router.set(router).is_err() {
            return false;
        }
        let Some(router) = self.router.get() else {
            return false;
        };
        for session in &self.sessions {
            for filter in session.value().subscriptions.lock().keys() {
                router.subscribe(filter.as_str());
            }
        }
        true
    }

    /// Forwards a publication made here to the cluster's nodes with matching subscribers.
    /// `$SYS` topics describe this node under the same names as every other node's: they
    /// stay here.
    fn forward(&self, now: Instant, message: &Message) {
        let Some(router) = self.router.get() else {
            return;
        };
        if !message.topic.as_str().starts_with("$SYS/") {
            router.forward_with(message.topic.as_str(), || {
                crate::forwarding::to_forwarded(message, now, router.id())
            });
        }
    }

    /// Routes a message another node forwarded to local subscribers only: every direct
    /// subscription, and of the shared groups only those the origin picked this node for
    /// (`share_groups`). It is never forwarded again. A copy that finds its session's queue
    /// full is dropped (forwarded messages have no publisher here to hold back).
    pub(crate) fn route_forwarded(
        &self,
        now: Instant,
        message: &Arc<Message>,
        share_groups: &[String],
    ) -> usize {
        let tree = self.subscriptions.load();
        let mut direct: SmallVec<[(u64, &Subscriber); 16]> = SmallVec::new();
        let mut groups = SmallVec::new();
        tree.for_each_match(&message.topic, |m| match m {
            Match::Direct(key, sub) => direct.push((*key, sub)),
            Match::Shared { group, members } => {
                if share_groups.iter().any(|g| g == group) {
                    groups.push(members);
                }
            }
        });
        direct.sort_unstable_by_key(|(k, _)| *k);
        let matches = Matches { direct, groups };
        let mut batch = Batch::direct(&*self.storage);
        let mut blocked = Blocked::new();
        let count = self.route_matches(now, message, &matches, &mut blocked, &mut batch, false);
        self.metrics.messages_dropped.inc_by(blocked.len() as u64);
        let _ = batch.commit();
        count
    }

    /// Routes a message to every matching subscription. Returns how many sessions it was
    /// handed to. `from` is the publishing session, for No Local. For a publication that
    /// nobody acknowledges: the stored copies are recorded on their own, and only the
    /// sessions that get them wait for them.
    pub(crate) fn route(&self, now: Instant, message: &Arc<Message>, from: Option<u64>) -> usize {
        let mut batch = Batch::direct(&*self.storage);
        let count = self.route_in(now, message, from, &mut batch);
        let _ = batch.commit();
        count
    }

    /// As [`Inner::route`], storing copies through `batch`.
    pub(crate) fn route_in(
        &self,
        now: Instant,
        message: &Arc<Message>,
        from: Option<u64>,
        batch: &mut Batch<'_>,
    ) -> usize {
        let mut blocked = Blocked::new();
        let count = self.route_or_block(now, message, from, &mut blocked, batch);
        self.metrics.messages_dropped.inc_by(blocked.len() as u64);
        self.publish_to_cluster(message, None, batch);
        count
    }

    /// In a cluster, records a QoS 1 or 2 publication for the persistent sessions of every
    /// node (see `cluster_sessions.rs`); `from` is the publishing client, for No Local.
    pub(crate) fn publish_to_cluster(
        &self,
        message: &Message,
        from: Option<&ClientId>,
        batch: &mut Batch<'_>,
    ) {
        if message.qos != QoS::AtMostOnce && self.cluster_storage.get().is_some() {
            let counter = self.next_seq.fetch_add(1, Ordering::Relaxed);
            let _ = batch.publish(message, from, counter);
        }
    }

    /// Routes like [`Inner::route`], except that a QoS 1 or 2 delivery to an online session
    /// whose queue is full is handed back in `blocked` rather than dropped: the publisher
    /// waits for room (see [`Inner::retry_blocked`]) before it acknowledges.
    pub(crate) fn route_or_block(
        &self,
        now: Instant,
        message: &Arc<Message>,
        from: Option<u64>,
        blocked: &mut Blocked,
        batch: &mut Batch<'_>,
    ) -> usize {
        self.forward(now, message);
        self.route_with(now, message, from, blocked, batch, false)
    }

    /// Routes a QoS 2 publication whole, through one `batch`: every copy is handed over or
    /// dropped now, none waits, so that the one atomic write of the batch covers all copies
    /// and the publisher's PUBREL state together (a crash leaves either all or none, and the
    /// publisher's retransmission is then answered or routed accordingly). Its publisher
    /// first waits until [`Inner::lacking_room`] finds no session without room; a session
    /// that filled up since, by another publisher's message, takes this copy beyond its
    /// limit, which is thus exceeded by at most one message per racing publisher. Members of
    /// a shared group with room are preferred. `matches` are what its room check found, if
    /// it was just made; else they are found now. Returns how many sessions it was handed to.
    pub(crate) fn route_whole(
        &self,
        now: Instant,
        message: &Arc<Message>,
        from: Option<u64>,
        matches: Option<&Matches<'_>>,
        batch: &mut Batch<'_>,
    ) -> usize {
        self.forward(now, message);
        let mut blocked = Blocked::new();
        let count = match matches {
            Some(matches) => self.route_matches(now, message, matches, &mut blocked, batch, true),
            None => self.route_with(now, message, from, &mut blocked, batch, true),
        };
        for (handle, delivery) in blocked {
            let handed = if delivery.qos == QoS::AtMostOnce {
                Handed::Dropped
            } else {
                handle.hand_over(now, delivery, self, batch, true)
            };
            if !matches!(handed, Handed::Taken) {
                self.metrics.messages_dropped.inc();
            }
        }
        count
    }

    /// The sessions a publication of `message` would wait for room in now (see
    /// [`SessionHandle::lacks_room`]): a QoS 2 publisher waits until there are none, then
    /// routes with [`Inner::route_whole`]. A shared group counts only if none of its members
    /// has room.
    pub(crate) fn lacking_room(&self, message: &Message, from: Option<u64>) -> Waits {
        let tree = self.subscriptions.load();
        let matches = Matches::find(&tree, message, from);
        self.lacking_room_in(message, &matches)
    }

    /// A snapshot of the subscription trie, to find a publication's [`Matches`] in.
    pub(crate) fn subscriptions(&self) -> Arc<Tree> {
        self.subscriptions.load_full()
    }

    /// As [`Inner::lacking_room`], among `matches`.
    pub(crate) fn lacking_room_in(&self, message: &Message, matches: &Matches<'_>) -> Waits {
        let mut waits = Waits::new();
        for members in &matches.groups {
            let mut lacking = None;
            let room = members.members().any(|(_, s)| {
                let qos = s.options.qos.min(message.qos);
                if matches!(*s.handle.slot.lock(), Slot::Ended) {
                    return false;
                }
                if s.handle.lacks_room(qos, self) {
                    lacking.get_or_insert_with(|| s.handle.clone());
                    return false;
                }
                true
            });
            if let (false, Some(handle)) = (room, lacking) {
                waits.push(handle);
            }
        }
        // One copy per session, at the highest QoS of its matching subscriptions.
        for group in matches.by_session() {
            let [(_, first), rest @ ..] = group else {
                continue;
            };
            let qos = rest
                .iter()
                .fold(first.options.qos, |q, (_, s)| q.max(s.options.qos));
            if first.handle.lacks_room(qos.min(message.qos), self) {
                waits.push(first.handle.clone());
            }
        }
        waits
    }

    /// Routes like [`Inner::route_or_block`]; with `prefer_room`, a shared group's message
    /// goes to a member with room if there is one.
    fn route_with(
        &self,
        now: Instant,
        message: &Arc<Message>,
        from: Option<u64>,
        blocked: &mut Blocked,
        batch: &mut Batch<'_>,
        prefer_room: bool,
    ) -> usize {
        let tree = self.subscriptions.load();
        let matches = Matches::find(&tree, message, from);
        self.route_matches(now, message, &matches, blocked, batch, prefer_room)
    }

    /// Routes `message` to `matches`, as [`Inner::route_with`] does.
    fn route_matches(
        &self,
        now: Instant,
        message: &Arc<Message>,
        matches: &Matches<'_>,
        blocked: &mut Blocked,
        batch: &mut Batch<'_>,
        prefer_room: bool,
    ) -> usize {
        let live = |s: &Subscriber| !matches!(*s.handle.slot.lock(), Slot::Ended);
        let roomy =
            |s: &Subscriber| live(s) && !s.handle.lacks_room(s.options.qos.min(message.qos), self);
        let shared: SmallVec<[&Subscriber; 4]> = matches
            .groups
            .iter()
            .filter_map(|members| {
                prefer_room
                    .then(|| members.pick(|_, s| roomy(s)))
                    .flatten()
                    .or_else(|| members.pick(|_, s| live(s)))
                    .map(|(_, sub)| sub)
            })
            .collect();
        // Overlapping subscriptions of one session yield one copy at the highest QoS, carrying
        // every matching subscription identifier [MQTT-3.3.4-2, MQTT-3.3.4-3].
        let mut count = 0;
        for group in matches.by_session() {
            let [(_, first), rest @ ..] = group else {
                continue;
            };
            let mut qos = first.options.qos;
            let mut retain_as_published = first.options.retain_as_published;
            let mut ids: Vec<NonZeroU32> = first.id.into_iter().collect();
            for (_, s) in rest {
                qos = qos.max(s.options.qos);
                retain_as_published |= s.options.retain_as_published;
                ids.extend(s.id);
            }
            let options = SubscriptionOptions {
                qos,
                retain_as_published,
                ..first.options
            };
            let handle = &first.handle;
            if let Some(d) = self.offer(now, handle, message, &options, ids, None, batch) {
                blocked.push((handle.clone(), d));
            }
            count += 1;
        }
        for sub in shared {
            let ids = sub.id.into_iter().collect();
            let shared = sub.shared.clone();
            if let Some(d) = self.offer(now, &sub.handle, message, &sub.options, ids, shared, batch)
            {
                blocked.push((sub.handle.clone(), d));
            }
            count += 1;
        }
        self.metrics.routed.inc_by(count as u64);
        count
    }

    /// Hands `message` to a session through a subscription with `options`, or hands it back
    /// for the publisher to wait with: a delivery to an online session whose queue is full,
    /// and a QoS 0 delivery to a connection whose output is backed up, wait for room unless a
    /// publisher already gave up waiting for that session (it is stalled); then they are
    /// dropped here, as is QoS 0 for a full queue.
    #[allow(clippy::too_many_arguments)]
    fn offer(
        &self,
        now: Instant,
        handle: &SessionHandle,
        message: &Arc<Message>,
        options: &SubscriptionOptions,
        subscription_ids: Vec<NonZeroU32>,
        shared: Option<TopicFilter>,
        batch: &mut Batch<'_>,
    ) -> Option<Delivery> {
        let qos0 = options.qos.min(message.qos) == QoS::AtMostOnce;
        if qos0 && handle.congested.load(Ordering::Relaxed) {
            // Slowing the publisher down costs less than reading what will be dropped.
            if !handle.stalled.load(Ordering::Relaxed) {
                return Some(Self::delivery(message, options, subscription_ids, shared));
            }
            self.metrics.messages_dropped.inc();
            return None;
        }
        if handle.saturated.load(Ordering::Relaxed) {
            if !qos0 && !handle.stalled.load(Ordering::Relaxed) {
                return Some(Self::delivery(message, options, subscription_ids, shared));
            }
            self.metrics.messages_dropped.inc();
            return None;
        }
        let delivery = Self::delivery(message, options, subscription_ids, shared);
        match handle.hand_over(now, delivery, self, batch, false) {
            Handed::Taken => None,
            Handed::Full(d) if !handle.stalled.load(Ordering::Relaxed) => Some(d),
            Handed::Full(_) | Handed::Dropped => {
                self.metrics.messages_dropped.inc();
                None
            }
        }
    }

    /// Tries again to hand over deliveries that found their session's queue full. Those that
    /// still find it full wait on, until `give_up`: then they are dropped and the session is
    /// marked stalled, so that one client that stopped reading holds up its publishers once,
    /// not for every message. Copies are stored through `batch`.
    pub(crate) fn retry_blocked(
        &self,
        now: Instant,
        blocked: &mut Blocked,
        give_up: bool,
        batch: &mut Batch<'_>,
    ) {
        let mut waiting = Blocked::new();
        for (handle, delivery) in blocked.drain(..) {
            let stalled = handle.stalled.load(Ordering::Relaxed);
            let backed_up =
                delivery.qos == QoS::AtMostOnce && handle.congested.load(Ordering::Relaxed);
            let full = (handle.saturated.load(Ordering::Relaxed) || backed_up) && !stalled;
            let outcome = if full {
                Handed::Full(delivery)
            } else if backed_up {
                Handed::Dropped
            } else {
                handle.hand_over(now, delivery, self, batch, false)
            };
            match outcome {
                Handed::Taken => {}
                Handed::Full(d) if !give_up && !stalled => waiting.push((handle, d)),
                Handed::Full(_) | Handed::Dropped => {
                    if give_up {
                        let _ = update_flag(&handle.stalled, true);
                    }
                    self.metrics.messages_dropped.inc();
                }
            }
        }
        *blocked = waiting;
    }

    /// The delivery of `message` through a subscription with these options.
    fn delivery(
        message: &Arc<Message>,
        options: &SubscriptionOptions,
        subscription_ids: Vec<NonZeroU32>,
        shared: Option<TopicFilter>,
    ) -> Delivery {
        Delivery {
            message: message.clone(),
            qos: options.qos.min(message.qos),
            retain: options.retain_as_published && message.retain,
            subscription_ids,
            shared,
            store_seq: None,
        }
    }

    /// Reason code for a SUBACK granting `qos`.
    pub(crate) fn granted(qos: QoS) -> ReasonCode {
        match qos {
            QoS::AtMostOnce => ReasonCode::Success,
            QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
            QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqttd_proto::TopicName;

    fn delivery(qos: QoS) -> Delivery {
        let topic = TopicName::try_from("t").unwrap();
        Delivery::new(Arc::new(Message::new(topic, b"x".to_vec(), qos, false)))
    }

    #[test]
    fn a_changed_max_sessions_applies_to_the_next_permits() {
        let count = Arc::new(SessionCount::new(1));
        let first = count.permit().expect("one place");
        assert!(count.permit().is_none(), "the limit is 1");
        count.set_max(2);
        let second = count
            .permit()
            .expect("a second place after raising the limit");
        count.set_max(1);
        assert!(count.permit().is_none(), "lowered: nothing new");
        assert_eq!(count.held(), 2, "places taken stay taken");
        drop((first, second));
        assert_eq!(count.held(), 0);
        count.set_max(0);
        let unlimited: Vec<_> = (0..5).filter_map(|_| count.permit()).collect();
        assert_eq!(unlimited.len(), 5, "0: no limit");
    }

    fn inner(config: Config) -> Arc<Inner> {
        Arc::new(Inner::new(
            config,
            Arc::new(crate::hooks::NoHooks),
            AccessControl::default(),
            ScramServer::new([0; 32]),
            Arc::new(crate::storage::MemoryStorage::default()),
        ))
    }

    /// A client with a long session expiry that reconnects again and again leaves one timer
    /// task behind, the one of its current offline spell, not one per reconnect.
    #[tokio::test]
    async fn reconnects_leave_at_most_one_session_timer_task() {
        let inner = inner(Config::default());
        let id = ClientId::try_from("mobile").unwrap();
        let mailbox = Arc::new(Mailbox::default());
        for round in 0..200 {
            let now = Instant::now();
            let acquired = inner.acquire_session(now, &id, false, 3600, &mailbox).await;
            assert_eq!(acquired.present, round > 0);
            let mut session = acquired.session;
            session.disconnected(now, None);
            inner.park_session(now, &acquired.handle, session, SystemTime::now());
        }
        // Cancelled tasks end the next time they run.
        let deadline = Instant::now() + Duration::from_secs(30);
        while inner.metrics.session_timers.get() > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(inner.metrics.session_timers.get(), 1);
        // Once the session ends, its last timer goes too.
        let now = Instant::now();
        let acquired = inner.acquire_session(now, &id, true, 0, &mailbox).await;
        inner.end_session(now, &acquired.handle, Some(acquired.session));
        while inner.metrics.session_timers.get() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(inner.metrics.session_timers.get(), 0);
    }

    /// A session ended while a takeover waits for it (another node of the cluster took it)
    /// is not installed on the connection that asked: that one gets a session of its own.
    #[tokio::test]
    async fn a_session_ended_while_it_moves_is_not_resumed() {
        let inner = inner(Config::default());
        let id = ClientId::try_from("moving").unwrap();
        let (old, new) = (Arc::new(Mailbox::default()), Arc::new(Mailbox::default()));
        let now = Instant::now();
        let first = inner.acquire_session(now, &id, false, 3600, &old).await;
        let taking = {
            let (inner, id, new) = (inner.clone(), id.clone(), new.clone());
            tokio::spawn(async move { inner.acquire_session(now, &id, false, 3600, &new).await })
        };
        // The old connection is asked for the session...
        let reply = loop {
            if let Some(reply) = old.take().takeover {
                break reply;
            }
            tokio::task::yield_now().await;
        };
        // ...which ends meanwhile, as a node does with a session another node claimed.
        let (_, handle) = inner.sessions.remove(&id).expect("registered");
        *handle.slot.lock() = Slot::Ended;
        let _ = reply.0.send(Some(first.session));
        let acquired = taking.await.expect("the takeover");
        assert!(!acquired.present, "an ended session was resumed");
        assert!(!Arc::ptr_eq(&acquired.handle, &first.handle));
        assert!(matches!(*first.handle.slot.lock(), Slot::Ended));
    }

    /// A session that stays in transfer (its old connection never answers) does not hold a
    /// new client forever, nor hand it a session that is not the one it asked for: after the
    /// retries the CONNECT is refused with 0x89, and the session stays registered.
    #[tokio::test(start_paused = true)]
    async fn a_session_stuck_in_transfer_refuses_the_connect_as_busy() {
        let inner = inner(Config::default());
        let id = ClientId::try_from("stuck").unwrap();
        let mailbox = Arc::new(Mailbox::default());
        let now = Instant::now();
        let first = inner.acquire_session(now, &id, false, 3600, &mailbox).await;
        *first.handle.slot.lock() = Slot::Transferring {
            buffer: Vec::new(),
            from: None,
        };
        let again = inner.acquire_session(now, &id, false, 3600, &mailbox).await;
        assert_eq!(again.refused, Some(ReasonCode::ServerBusy));
        assert!(!again.present);
        let registered = inner.sessions.get(&id).map(|h| h.clone());
        assert!(registered.is_some_and(|h| Arc::ptr_eq(&h, &first.handle)));
    }

    /// A client that comes back after its session expired, before the expiry timer ran,
    /// gets a new session: nothing of the old one is resumed.
    #[tokio::test]
    async fn an_expired_session_is_not_resumed_even_before_its_timer_ran() {
        let inner = inner(Config::default());
        let id = ClientId::try_from("late").unwrap();
        let mailbox = Arc::new(Mailbox::default());
        let start = Instant::now();
        let acquired = inner.acquire_session(start, &id, true, 1, &mailbox).await;
        let mut session = acquired.session;
        session.disconnected(start, None);
        assert_eq!(
            session.enqueue(start, delivery(QoS::AtLeastOnce)),
            Enqueued::Queued
        );
        inner.park_session(start, &acquired.handle, session, SystemTime::now());
        // Two seconds later by the clock passed in; the timer task, on the real clock, has
        // not run yet.
        let later = start + Duration::from_secs(2);
        let acquired = inner.acquire_session(later, &id, false, 1, &mailbox).await;
        assert!(!acquired.present, "an expired session was resumed");
        assert_eq!(acquired.session.queued().len(), 0);
        // Within its expiry it is resumed, with what it queued.
        let acquired2 = {
            let mut session = acquired.session;
            session.disconnected(later, None);
            assert_eq!(
                session.enqueue(later, delivery(QoS::AtLeastOnce)),
                Enqueued::Queued
            );
            inner.park_session(later, &acquired.handle, session, SystemTime::now());
            inner.acquire_session(later, &id, false, 1, &mailbox).await
        };
        assert!(acquired2.present);
        assert_eq!(acquired2.session.queued().len(), 1);
    }

    /// What an offline session's queue holds after a QoS 0 and a QoS 1 message were routed to
    /// it, and after the same arrived while its connection was closing.
    async fn offline_queue(offline_qos0: OfflineQos0) -> (Vec<QoS>, Vec<QoS>) {
        let inner = inner(Config {
            offline_qos0,
            ..Config::default()
        });
        let id = ClientId::try_from("c").unwrap();
        let mailbox = Arc::new(Mailbox::default());
        let now = Instant::now();
        let acquired = inner.acquire_session(now, &id, true, 3600, &mailbox).await;
        let handle = acquired.handle;
        // Closing: deliveries wait in the slot until the session is parked.
        *handle.slot.lock() = Slot::Transferring {
            buffer: Vec::new(),
            from: None,
        };
        assert!(handle.deliver(now, delivery(QoS::AtMostOnce), &inner));
        assert!(handle.deliver(now, delivery(QoS::AtLeastOnce), &inner));
        inner.park_session(now, &handle, acquired.session, SystemTime::now());
        let queued = |handle: &SessionHandle| match &*handle.slot.lock() {
            Slot::Offline { session, .. } => session.queued().map(|d| d.qos).collect::<Vec<_>>(),
            other => panic!("not offline: {other:?}"),
        };
        let closing = queued(&handle);
        // Offline: routed straight into the parked session.
        let id = ClientId::try_from("d").unwrap();
        let acquired = inner.acquire_session(now, &id, true, 3600, &mailbox).await;
        let handle = acquired.handle;
        inner.park_session(now, &handle, acquired.session, SystemTime::now());
        let _ = handle.deliver(now, delivery(QoS::AtMostOnce), &inner);
        let _ = handle.deliver(now, delivery(QoS::AtLeastOnce), &inner);
        (closing, queued(&handle))
    }

    #[tokio::test]
    async fn offline_sessions_queue_qos0_only_if_offline_qos0_is_queue() {
        let qos1 = vec![QoS::AtLeastOnce];
        assert_eq!(offline_queue(OfflineQos0::Drop).await, (qos1.clone(), qos1));
        let both = vec![QoS::AtMostOnce, QoS::AtLeastOnce];
        assert_eq!(
            offline_queue(OfflineQos0::Queue).await,
            (both.clone(), both)
        );
    }

    #[test]
    fn what_waits_for_a_connection_or_a_takeover_is_bounded() {
        let config = Config {
            max_queued_messages: 3,
            max_inflight_messages: 2,
            ..Config::default()
        };
        let inner = Inner::new(
            config,
            Arc::new(crate::hooks::NoHooks),
            AccessControl::default(),
            ScramServer::new([0; 32]),
            Arc::new(crate::storage::MemoryStorage::default()),
        );
        let mailbox = Arc::new(Mailbox::default());
        let handle = inner.new_handle(
            &ClientId::try_from("c").unwrap(),
            Slot::Online {
                mailbox: mailbox.clone(),
            },
        );
        let now = Instant::now();
        let accepted = (0..10)
            .filter(|_| handle.deliver(now, delivery(QoS::AtLeastOnce), &inner))
            .count();
        assert_eq!(accepted, 5, "queue limit plus in-flight window");
        assert_eq!(mailbox.take().deliveries.len(), 5);
        assert!(
            handle.deliver(now, delivery(QoS::AtLeastOnce), &inner),
            "room again once taken"
        );

        *handle.slot.lock() = Slot::Transferring {
            buffer: Vec::new(),
            from: None,
        };
        let accepted = (0..10)
            .filter(|_| handle.deliver(now, delivery(QoS::AtMostOnce), &inner))
            .count();
        assert_eq!(accepted, 5);
    }
}
