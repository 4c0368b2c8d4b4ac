//! Routes and message forwarding between nodes: the runtime around [`RouteTable`].
//!
//! A [`Router`] (one per [`crate::ClusterNode`]) keeps the node's route table, streams the
//! node's own routes to every peer of the Raft membership and forwards messages to the peers
//! whose routes match. It has one outbound *forwarding link* per peer: a QUIC connection on the
//! cluster endpoint with its own ALPN ([`FORWARD_ALPN`]), dialled by the sender, carrying
//!
//! - one bidirectional *routes stream*: a [`RouteSnapshot`](crate::routes::RouteSnapshot) first, then [`RouteDelta`]s; the
//!   receiver answers [`Frame::Resync`] when it sees a gap and gets a snapshot back;
//! - up to [`BUCKETS`] unidirectional *message streams*, one per hash bucket of the topic, so
//!   that messages of one topic keep their order while a slow topic only holds up its bucket.
//!
//! Forwarding is at most once (QoS 0 semantics between nodes, as EMQX's asynchronous
//! forwarding): each link has a bounded queue, in messages and bytes; a message that does not
//! fit, or that is bound for a peer whose link is down, is dropped and counted. After a link
//! fails it is dialled again (with backoff up to 2 s) and starts over with a snapshot, so a
//! peer's view of this node's routes is whole again after every reconnect.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use crate::routes::{Applied, Fnv, RouteDelta, RouteDigest, RouteTable};
use crate::state::NodeId;
use crate::wire::{
    frame_len, ForwardedMessage, Frame, WireError, MAX_MESSAGE_FRAME, MAX_ROUTE_FRAME,
};
use crate::{Member, Raft};

pub use crate::wire::FORWARD_ALPN;

/// Message streams per link: messages of one topic share a bucket, hence their order.
pub const BUCKETS: usize = 16;

/// The longest wait between two dials of a peer that is down.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Route changes kept for links that have not sent them yet; a link that falls further
/// behind sends a snapshot instead.
const DELTA_BACKLOG: usize = 4096;

/// The messages peers forward to this node (see [`Router::incoming`]).
pub struct Incoming {
    rx: mpsc::Receiver<(ForwardedMessage, OwnedSemaphorePermit)>,
}

impl Incoming {
    /// The next message; `None` once the node stopped.
    pub async fn recv(&mut self) -> Option<ForwardedMessage> {
        self.rx.recv().await.map(|(m, _room)| m)
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<ForwardedMessage> {
        self.rx.try_recv().ok().map(|(m, _room)| m)
    }
}

/// Bounds of the forwarding queues.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ForwardLimits {
    /// Messages queued per peer at most.
    pub queue_messages: usize,
    /// Bytes queued per peer at most (see [`ForwardedMessage::size`]).
    pub queue_bytes: usize,
    /// Messages arrived from peers and not yet taken by the broker; when full, the links
    /// stop reading (QUIC flow control then holds the senders, whose queues drop).
    pub incoming_messages: usize,
    /// Bytes of those messages at most (see [`ForwardedMessage::size`]); a message bigger
    /// than this waits until the inbox is empty.
    pub incoming_bytes: usize,
}

impl Default for ForwardLimits {
    fn default() -> Self {
        Self {
            queue_messages: 4096,
            queue_bytes: 16 * 1024 * 1024,
            incoming_messages: 4096,
            incoming_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The router's counters, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouterStats {
    /// Messages written to peers' links.
    pub forwarded_out: u64,
    /// Messages received from peers.
    pub forwarded_in: u64,
    /// Messages not forwarded: queue full, link down, or lost with a failing link.
    pub dropped: u64,
    /// Per node (this one included): what this node knows of it.
    pub nodes: BTreeMap<NodeId, NodeStats>,
}

/// What a node knows of one node of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeStats {
    /// Its routes as this node holds them.
    pub routes: usize,
    /// Their digest.
    pub digest: RouteDigest,
    /// The incarnation they are of.
    pub incarnation: Option<u64>,
    /// Whether this node's forwarding link to it is up (false for this node itself).
    pub link_up: bool,
    /// Messages written to it.
    pub forwarded: u64,
    /// Messages for it dropped.
    pub dropped: u64,
    /// Messages queued for it now.
    pub queued: usize,
}

/// Why a forwarding link failed.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("cannot reach the peer: {0}")]
    Unreachable(String),
    #[error("link failed: {0}")]
    Failed(String),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("unexpected frame on a {0} stream")]
    Unexpected(&'static str),
    #[error("a peer spoke for node {0}, which its certificate does not name")]
    Impostor(NodeId),
}

fn failed(e: impl std::fmt::Display) -> LinkError {
    LinkError::Failed(e.to_string())
}

/// Routes and forwarding of one node. Cheap to clone; every clone is the same router.
#[derive(Clone)]
pub struct Router {
    shared: Arc<Shared>,
}

struct Shared {
    id: NodeId,
    /// Read by every publication, written by route changes.
    table: RwLock<RouteTable>,
    /// This node's route changes, for the links (sent under the table's lock, so in order).
    deltas: broadcast::Sender<RouteDelta>,
    links: Mutex<BTreeMap<NodeId, Arc<Link>>>,
    incoming: mpsc::Sender<(ForwardedMessage, OwnedSemaphorePermit)>,
    incoming_rx: Mutex<Option<Incoming>>,
    /// The inbox's byte budget: a message holds its size in permits until it is taken.
    incoming_bytes: Arc<Semaphore>,
    forwarded_in: AtomicU64,
    /// Drops for nodes with no link (not in the membership).
    dropped_unlinked: AtomicU64,
    limits: ForwardLimits,
    endpoint: noq::Endpoint,
    client: noq::ClientConfig,
    raft: Raft,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// The outbound link to one peer.
struct Link {
    member: Member,
    queue: mpsc::Sender<ForwardedMessage>,
    queued_bytes: AtomicUsize,
    up: AtomicBool,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    stop: CancellationToken,
}

impl Link {
    fn drop_one(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

// No code panics while holding these locks; a poisoned one still holds consistent data.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Router {
    /// A router for node `id` in life `incarnation`, dialling with `client` (whose ALPN is
    /// [`FORWARD_ALPN`]); it follows `raft`'s membership for its peers. Its tasks are in
    /// `tasks` and end with `stop`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: NodeId,
        incarnation: u64,
        endpoint: noq::Endpoint,
        client: noq::ClientConfig,
        raft: Raft,
        stop: CancellationToken,
        tasks: TaskTracker,
        limits: ForwardLimits,
    ) -> Self {
        let (incoming, incoming_rx) = mpsc::channel(limits.incoming_messages.max(1));
        let shared = Arc::new(Shared {
            id,
            table: RwLock::new(RouteTable::new(id, incarnation)),
            deltas: broadcast::channel(DELTA_BACKLOG).0,
            links: Mutex::new(BTreeMap::new()),
            incoming,
            incoming_rx: Mutex::new(Some(Incoming { rx: incoming_rx })),
            incoming_bytes: Arc::new(Semaphore::new(
                limits.incoming_bytes.clamp(1, Semaphore::MAX_PERMITS),
            )),
            forwarded_in: AtomicU64::new(0),
            dropped_unlinked: AtomicU64::new(0),
            limits,
            endpoint,
            client,
            raft,
            stop,
            tasks,
        });
        shared
            .tasks
            .spawn(follow_membership(Arc::downgrade(&shared)));
        Self { shared }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.shared.id
    }

    /// A local subscriber took `filter` (as the client sent it; `$share/{group}/{filter}`
    /// is a route of `filter` for `group`). The first subscriber of a filter announces it to
    /// the peers.
    pub fn subscribe(&self, filter: &str) {
        let mut table = write(&self.shared.table);
        if let Some(delta) = table.subscribe(filter) {
            // No link listening is fine: each sends a snapshot when it comes up.
            let _ = self.shared.deltas.send(delta);
        }
    }

    /// A local subscriber dropped `filter`; the last one withdraws it from the peers.
    pub fn unsubscribe(&self, filter: &str) {
        let mut table = write(&self.shared.table);
        if let Some(delta) = table.unsubscribe(filter) {
            let _ = self.shared.deltas.send(delta);
        }
    }

    /// Sends one copy of `message` to each peer with a matching route: every node with a
    /// plain subscription, and for each share group with no member on this node, one node
    /// holding a member (picked by the topic's hash, so a topic sticks to one node), named in
    /// the copy's `share_groups`. A message from another node (its `origin` is not this
    /// node) is never forwarded again. Returns how many copies were queued; the others were
    /// dropped (and counted).
    pub fn forward(&self, message: &ForwardedMessage) -> usize {
        if message.origin != self.shared.id {
            return 0;
        }
        let targets = self.targets(&message.topic);
        self.send(message, targets)
    }

    /// As [`Router::forward`], building the message (whose `origin` is set to this node)
    /// only if some peer has a matching route: a publication nobody elsewhere wants costs a
    /// trie walk, no copy.
    pub fn forward_with(&self, topic: &str, make: impl FnOnce() -> ForwardedMessage) -> usize {
        let targets = self.targets(topic);
        if targets.is_empty() {
            return 0;
        }
        let mut message = make();
        message.origin = self.shared.id;
        self.send(&message, targets)
    }

    /// The peers a message on `topic` goes to, each with the share groups it serves.
    fn targets(&self, topic: &str) -> BTreeMap<NodeId, Vec<String>> {
        let mut targets: BTreeMap<NodeId, Vec<String>> = BTreeMap::new();
        let table = read(&self.shared.table);
        for node in table.nodes_for(topic) {
            targets.entry(node).or_default();
        }
        let shared = table.shared_for(topic);
        if !shared.is_empty() {
            let hash = bucket_hash(topic);
            for (group, nodes) in shared {
                // A member here is served here: no copy leaves for this group.
                if nodes.contains(&self.shared.id) || nodes.is_empty() {
                    continue;
                }
                let pick = usize::try_from(hash % nodes.len() as u64).unwrap_or(0);
                if let Some(node) = nodes.iter().nth(pick) {
                    targets.entry(*node).or_default().push(group);
                }
            }
        }
        targets
    }

    fn send(&self, message: &ForwardedMessage, targets: BTreeMap<NodeId, Vec<String>>) -> usize {
        if targets.is_empty() {
            return 0;
        }
        let links = lock(&self.shared.links);
        let mut queued = 0;
        for (node, groups) in targets {
            let Some(link) = links.get(&node) else {
                self.shared.dropped_unlinked.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let mut copy = message.clone();
            copy.share_groups = groups;
            if self.enqueue(link, copy) {
                queued += 1;
            }
        }
        queued
    }

    fn enqueue(&self, link: &Link, message: ForwardedMessage) -> bool {
        if !link.up.load(Ordering::Relaxed) {
            link.drop_one();
            return false;
        }
        let size = message.size();
        let held = link.queued_bytes.fetch_add(size, Ordering::Relaxed);
        if held + size > self.shared.limits.queue_bytes {
            link.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            link.drop_one();
            return false;
        }
        if link.queue.try_send(message).is_err() {
            link.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            link.drop_one();
            return false;
        }
        true
    }

    /// The messages peers forward to this node, to be delivered to local subscribers only.
    /// There is one receiver: the first call takes it, later ones get `None`.
    pub fn incoming(&self) -> Option<Incoming> {
        lock(&self.shared.incoming_rx).take()
    }

    /// The peers with a plain subscription matching `topic`.
    pub fn nodes_for(&self, topic: &str) -> BTreeSet<NodeId> {
        read(&self.shared.table).nodes_for(topic)
    }

    /// The digest of every node's routes as this node holds them.
    pub fn digests(&self) -> BTreeMap<NodeId, RouteDigest> {
        read(&self.shared.table).digests()
    }

    /// The counters.
    pub fn stats(&self) -> RouterStats {
        let mut stats = RouterStats {
            forwarded_in: self.shared.forwarded_in.load(Ordering::Relaxed),
            dropped: self.shared.dropped_unlinked.load(Ordering::Relaxed),
            ..RouterStats::default()
        };
        {
            let table = read(&self.shared.table);
            for (node, digest) in table.digests() {
                stats.nodes.insert(
                    node,
                    NodeStats {
                        routes: table.route_count(node),
                        digest,
                        incarnation: table.incarnation_of(node),
                        ..NodeStats::default()
                    },
                );
            }
        }
        for (node, link) in lock(&self.shared.links).iter() {
            let s = stats.nodes.entry(*node).or_default();
            s.link_up = link.up.load(Ordering::Relaxed);
            s.forwarded = link.forwarded.load(Ordering::Relaxed);
            s.dropped = link.dropped.load(Ordering::Relaxed);
            s.queued = link.queue.max_capacity() - link.queue.capacity();
            stats.forwarded_out += s.forwarded;
            stats.dropped += s.dropped;
        }
        stats
    }

    /// Serves a forwarding link a peer dialled (its certificate names `names`), until it
    /// closes or the node stops.
    pub(crate) async fn serve_link(self, conn: noq::Connection, names: Arc<[String]>) {
        let shared = &self.shared;
        loop {
            tokio::select! {
                biased;
                () = shared.stop.cancelled() => break,
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        shared.tasks.spawn(read_routes(self.shared.clone(), names.clone(), send, recv));
                    }
                    Err(_) => break,
                },
                uni = conn.accept_uni() => match uni {
                    Ok(recv) => {
                        shared.tasks.spawn(read_messages(self.shared.clone(), recv));
                    }
                    Err(_) => break,
                },
            }
        }
    }
}

fn bucket_hash(topic: &str) -> u64 {
    let mut h = Fnv::new();
    h.write(topic.as_bytes());
    h.finish()
}

/// Reads one frame of at most `max` bytes; `None` when the stream ends between frames.
async fn read_frame(recv: &mut noq::RecvStream, max: usize) -> Result<Option<Frame>, LinkError> {
    let mut prefix = [0; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(noq::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(failed(e)),
    }
    let len = frame_len(prefix, max)?;
    let mut body = vec![0; len];
    recv.read_exact(&mut body).await.map_err(failed)?;
    Ok(Some(Frame::decode(Bytes::from(body))?))
}

async fn write_frame(send: &mut noq::SendStream, frame: &Frame) -> Result<(), LinkError> {
    send.write_all(&frame.encode()).await.map_err(failed)
}

/// The receiving end of a routes stream: applies the peer's snapshots and deltas, asks for a
/// snapshot on a gap.
async fn read_routes(
    shared: Arc<Shared>,
    names: Arc<[String]>,
    mut send: noq::SendStream,
    mut recv: noq::RecvStream,
) {
    let mut speaker: Option<NodeId> = None;
    let result: Result<(), LinkError> = async {
        loop {
            let frame = tokio::select! {
                biased;
                () = shared.stop.cancelled() => return Ok(()),
                frame = read_frame(&mut recv, MAX_ROUTE_FRAME) => frame?,
            };
            let node = match &frame {
                Some(Frame::Snapshot(s)) => s.node,
                Some(Frame::Delta(d)) => d.node,
                Some(_) => return Err(LinkError::Unexpected("routes")),
                None => return Ok(()),
            };
            // One stream speaks for one node, the one its certificate names.
            if speaker.is_some_and(|s| s != node)
                || !crate::network::may_speak_for(&shared.raft, &names, Some(node))
            {
                return Err(LinkError::Impostor(node));
            }
            speaker = Some(node);
            let applied = {
                let mut table = write(&shared.table);
                match &frame {
                    Some(Frame::Snapshot(s)) => table.apply_snapshot(s),
                    Some(Frame::Delta(d)) => table.apply_delta(d),
                    _ => Applied::Stale,
                }
            };
            if applied == Applied::NeedResync {
                write_frame(&mut send, &Frame::Resync).await?;
            }
        }
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, node = ?speaker, "routes stream ended");
    }
}

/// The receiving end of a message stream: hands the messages to the broker, in order.
async fn read_messages(shared: Arc<Shared>, mut recv: noq::RecvStream) {
    loop {
        let frame = tokio::select! {
            biased;
            () = shared.stop.cancelled() => return,
            frame = read_frame(&mut recv, MAX_MESSAGE_FRAME) => frame,
        };
        let message = match frame {
            Ok(Some(Frame::Message(m))) => m,
            Ok(None) => return,
            Ok(Some(_)) => {
                tracing::debug!("unexpected frame on a message stream");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "message stream ended");
                return;
            }
        };
        shared.forwarded_in.fetch_add(1, Ordering::Relaxed);
        // Waiting here holds the stream: QUIC flow control pushes back to the sender.
        let budget = shared.incoming_bytes.clone();
        let want = u32::try_from(message.size())
            .unwrap_or(u32::MAX)
            .min(u32::try_from(shared.limits.incoming_bytes.max(1)).unwrap_or(u32::MAX));
        let sent = tokio::select! {
            biased;
            () = shared.stop.cancelled() => return,
            sent = async {
                let Ok(permit) = budget.acquire_many_owned(want).await else {
                    return Ok(());
                };
                shared.incoming.send((message, permit)).await.map_err(|_| ())
            } => sent,
        };
        if sent.is_err() {
            // Nobody takes forwarded messages (the receiver was dropped): keep draining.
        }
    }
}

/// Keeps one outbound link per member of the Raft membership (this node aside).
async fn follow_membership(shared: std::sync::Weak<Shared>) {
    let Some(strong) = shared.upgrade() else {
        return;
    };
    let mut metrics = strong.raft.metrics();
    let stop = strong.stop.clone();
    drop(strong);
    let mut known: BTreeMap<NodeId, Member> = BTreeMap::new();
    loop {
        let members: BTreeMap<NodeId, Member> = metrics
            .borrow_and_update()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, m)| (*id, m.clone()))
            .collect();
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if members != known {
            reconcile(&shared, &members);
            known = members;
        }
        drop(shared);
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}

fn reconcile(shared: &Arc<Shared>, members: &BTreeMap<NodeId, Member>) {
    let mut links = lock(&shared.links);
    let gone: Vec<NodeId> = links
        .iter()
        .filter(|(id, link)| members.get(id) != Some(&link.member))
        .map(|(id, _)| *id)
        .collect();
    for id in gone {
        if let Some(link) = links.remove(&id) {
            link.stop.cancel();
        }
        if !members.contains_key(&id) {
            write(&shared.table).forget(id);
        }
    }
    for (id, member) in members {
        if *id == shared.id || links.contains_key(id) {
            continue;
        }
        let (queue, rx) = mpsc::channel(shared.limits.queue_messages.max(1));
        let link = Arc::new(Link {
            member: member.clone(),
            queue,
            queued_bytes: AtomicUsize::new(0),
            up: AtomicBool::new(false),
            forwarded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            stop: shared.stop.child_token(),
        });
        links.insert(*id, link.clone());
        shared.tasks.spawn(run_link(shared.clone(), link, rx));
    }
}

/// Dials a peer, drives the link until it fails, and starts over, until the link stops.
async fn run_link(
    shared: Arc<Shared>,
    link: Arc<Link>,
    mut queue: mpsc::Receiver<ForwardedMessage>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = tokio::select! {
            biased;
            () = link.stop.cancelled() => break,
            conn = dial(&shared, &link.member) => match conn {
                Ok(conn) => {
                    backoff = Duration::from_millis(100);
                    let outcome = drive(&shared, &link, &conn, &mut queue).await;
                    conn.close(noq::VarInt::from_u32(0), b"link closed");
                    outcome
                }
                Err(e) => Err(e),
            },
        };
        link.up.store(false, Ordering::Relaxed);
        // What was queued for a dead link is lost: drop it now rather than send it late.
        while let Ok(m) = queue.try_recv() {
            link.queued_bytes.fetch_sub(m.size(), Ordering::Relaxed);
            link.drop_one();
        }
        if let Err(e) = outcome {
            tracing::debug!(peer = %link.member, error = %e, "forwarding link down");
        }
        tokio::select! {
            biased;
            () = link.stop.cancelled() => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    link.up.store(false, Ordering::Relaxed);
}

async fn dial(shared: &Shared, member: &Member) -> Result<noq::Connection, LinkError> {
    crate::network::dial(&shared.endpoint, Some(shared.client.clone()), member)
        .await
        .map_err(|why| LinkError::Unreachable(format!("{member}: {why}")))
}

/// Sends this node's routes (a snapshot, then deltas) and the queued messages on one
/// connection, until it fails or the link stops.
async fn drive(
    shared: &Arc<Shared>,
    link: &Link,
    conn: &noq::Connection,
    queue: &mut mpsc::Receiver<ForwardedMessage>,
) -> Result<(), LinkError> {
    let (mut routes, mut answers) = conn.open_bi().await.map_err(failed)?;
    // Subscribed before the snapshot is taken: no change falls between the two.
    let mut deltas = shared.deltas.subscribe();
    let mut sent = send_snapshot(shared, &mut routes).await?;
    link.up.store(true, Ordering::Relaxed);

    // The peer's resync requests, read beside the loop (a frame read is not cancel-safe).
    let (resync_tx, mut resync) = mpsc::channel::<()>(1);
    let _reader = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Ok(Some(Frame::Resync)) = read_frame(&mut answers, MAX_ROUTE_FRAME).await {
            let _ = resync_tx.try_send(());
        }
    }));

    // Routes and messages go on side by side: a message stream stalled by a peer that does
    // not keep up holds up neither the routes nor, on that peer, their application.
    let send_routes = async {
        loop {
            tokio::select! {
                biased;
                request = resync.recv() => match request {
                    Some(()) => sent = send_snapshot(shared, &mut routes).await?,
                    None => return Err(failed("the peer closed the routes stream")),
                },
                delta = deltas.recv() => match delta {
                    Ok(delta) if delta.seq > sent => {
                        sent = delta.seq;
                        write_frame(&mut routes, &Frame::Delta(delta)).await?;
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        sent = send_snapshot(shared, &mut routes).await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
            }
        }
    };
    let send_messages = async {
        let mut buckets: Vec<Option<noq::SendStream>> = (0..BUCKETS).map(|_| None).collect();
        while let Some(message) = queue.recv().await {
            link.queued_bytes
                .fetch_sub(message.size(), Ordering::Relaxed);
            let bucket = usize::try_from(bucket_hash(&message.topic) % BUCKETS as u64).unwrap_or(0);
            let Some(slot) = buckets.get_mut(bucket) else {
                continue;
            };
            let stream = match slot {
                Some(s) => s,
                None => slot.insert(conn.open_uni().await.map_err(failed)?),
            };
            let frame = Frame::Message(message);
            if !frame_len_ok(&frame) {
                link.drop_one();
                continue;
            }
            if let Err(e) = write_frame(stream, &frame).await {
                link.drop_one();
                return Err(e);
            }
            link.forwarded.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    };
    tokio::select! {
        biased;
        () = link.stop.cancelled() => Ok(()),
        e = conn.closed() => Err(failed(e)),
        done = send_routes => done,
        done = send_messages => done,
    }
}

/// Whether a message frame is within what the peer reads.
fn frame_len_ok(frame: &Frame) -> bool {
    match frame {
        Frame::Message(m) => m.size() <= MAX_MESSAGE_FRAME - 1024,
        _ => true,
    }
}

/// Sends this node's routes as they are now; returns the last change they include.
async fn send_snapshot(shared: &Shared, routes: &mut noq::SendStream) -> Result<u64, LinkError> {
    let snapshot = read(&shared.table).snapshot();
    let seq = snapshot.seq;
    write_frame(routes, &Frame::Snapshot(snapshot)).await?;
    Ok(seq)
}
