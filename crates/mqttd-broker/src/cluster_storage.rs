//! The broker's storage in a cluster: what belongs to a persistent session the cluster owns
//! goes to Raft, everything else to the local store, under one numbering of tickets.
//!
//! A session is the cluster's once this node has claimed it ([`ClusterStorage::owned`]):
//! its record (subscriptions, will, expiry), the messages routed to it and their flow, and its
//! client's QoS 2 state become session commands, recorded through the cluster's
//! [`Proposer`] (group commit) and never written locally, so that a node that restarts does
//! not bring back a session that has moved on. A ticket is durable once both its parts are:
//! the local store's watermark covers its local change, and the Raft entry holding its
//! commands is committed. Whatever a failure loses on either side is lost for the whole.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mqttd_cluster::session::{MessageId, Step, StoredMessage, StoredProperties, StoredWill};
use mqttd_cluster::state::Retained;
use mqttd_cluster::{Command, NodeId, Outcome, Proposer, Settled};
use mqttd_proto::session::OutboundState;
use mqttd_proto::{ClientId, Delivery, Message, PacketId};
use tokio::sync::watch;

use crate::storage::{
    Batch, Fence, Recovered, SessionRecord, Storage, StorageBatch, StorageError, Ticket, Watermark,
};

/// How long after its batch was first proposed a session command's commit may be learned
/// and still be answered for: less than the lease a new owner waits for (3 s,
/// `cluster_sessions::LEASE`), with room for the answer to go out.
const LATE_COMMIT: Duration = Duration::from_secs(2);

/// How long a confirmation that this node still owns a session lets PUBLISHes to it go out
/// without another ([`ClusterStorage::delivery_fence`]): with [`LATE_COMMIT`], less than the
/// lease a new owner waits for (3 s, `cluster_sessions::LEASE`).
const FENCE_FRESH: Duration = Duration::from_secs(1);

/// What a session the cluster owns needs here.
#[derive(Debug)]
struct Owned {
    /// The epoch of this node's claim.
    epoch: u64,
    /// The identity in the cluster of each message routed to the session, by its local
    /// [`Delivery::store_seq`].
    messages: HashMap<u64, MessageId>,
    /// Queue numbers below this were in the replicated session when this node built it
    /// from there, or were handed to it since: their `Queued` effects are not delivered
    /// again (queue numbers grow in log order).
    from_seq: u64,
    /// The latest confirmation that the session is still this node's: when it was recorded,
    /// and its ticket ([`ClusterStorage::delivery_fence`]).
    fence: Option<(tokio::time::Instant, u64)>,
}

/// This node in the cluster, once it has started.
struct Node {
    id: NodeId,
    incarnation: u64,
    proposer: Proposer,
}

/// A recorded change, until both its parts are durable.
#[derive(Debug)]
struct Pending {
    ticket: u64,
    local: Ticket,
    /// The proposer's tickets of its commands, from the first to the last; 0: none.
    raft_first: u64,
    raft: u64,
    /// A batch not yet committed: nothing after it is durable.
    open: bool,
    /// The proposal holding its commands failed: it is lost, and so is everything recorded
    /// after it that is not durable yet.
    lost: bool,
    /// One of its commands was refused (its session was claimed by another node): held
    /// until the session's connection here has closed, so that nothing that depended on it
    /// goes out.
    held: bool,
}

#[derive(Debug, Default)]
struct Tickets {
    /// The last ticket handed out.
    last: u64,
    pending: VecDeque<Pending>,
    /// Every proposer ticket up to this is committed, unless lost.
    raft_committed: u64,
}

impl Tickets {
    /// Hands out the next ticket, pending until its parts are durable.
    fn push(
        &mut self,
        local: Ticket,
        (raft_first, raft): (u64, u64),
        open: bool,
        held: bool,
    ) -> u64 {
        self.last += 1;
        self.pending.push_back(Pending {
            ticket: self.last,
            local,
            raft_first,
            raft,
            open,
            held,
            lost: false,
        });
        self.last
    }
}

/// The broker's storage in a cluster (see the module's documentation).
pub(crate) struct ClusterStorage {
    local: Arc<dyn Storage>,
    node: OnceLock<Node>,
    owned: Mutex<HashMap<ClientId, Owned>>,
    tickets: Mutex<Tickets>,
    watermark: watch::Sender<Watermark>,
    /// The most messages a session's queue holds, as the cluster is told.
    max_queued: u32,
    /// The session each proposed session command is for, by proposer ticket, until settled.
    session_tickets: Mutex<HashMap<u64, (ClientId, u64)>>,
    /// The tickets held for each session whose command was refused.
    holds: Mutex<HashMap<ClientId, Vec<u64>>>,
    /// Sessions another node took while a connection here may still be serving them: what
    /// that connection records is held until it has closed ([`ClusterStorage::unhold`]), so
    /// that nothing it sends after the takeover depends on a change the cluster never took.
    surrendered: Mutex<HashSet<ClientId>>,
    /// Told of a session whose command the cluster refused: it must let the session go, then
    /// call [`ClusterStorage::unhold`].
    on_refused: OnceLock<Box<dyn Fn(ClientId) + Send + Sync>>,
}

impl std::fmt::Debug for ClusterStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterStorage").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ClusterStorage {
    /// Storage over `local`; sessions go to the cluster once [`ClusterStorage::attach`] is
    /// called and this node claims them. Follows the local watermark from a task.
    pub(crate) fn new(local: Arc<dyn Storage>, max_queued: usize) -> Arc<Self> {
        let storage = Arc::new(Self {
            local,
            node: OnceLock::new(),
            owned: Mutex::default(),
            tickets: Mutex::default(),
            watermark: watch::Sender::new(Watermark::default()),
            max_queued: u32::try_from(max_queued).unwrap_or(u32::MAX),
            session_tickets: Mutex::default(),
            holds: Mutex::default(),
            surrendered: Mutex::default(),
            on_refused: OnceLock::new(),
        });
        let mut local = storage.local.watermark();
        let weak = Arc::downgrade(&storage);
        tokio::spawn(async move {
            while local.changed().await.is_ok() {
                let Some(storage) = weak.upgrade() else {
                    return;
                };
                storage.advance(&mut lock(&storage.tickets));
            }
        });
        storage
    }

    /// Connects the storage to the cluster: session commands go through `proposer`.
    pub(crate) fn attach(&self, id: NodeId, incarnation: u64, proposer: Proposer) {
        let _ = self.node.set(Node {
            id,
            incarnation,
            proposer,
        });
    }

    /// This node's id, once attached.
    pub(crate) fn node_id(&self) -> Option<NodeId> {
        self.node.get().map(|n| n.id)
    }

    /// Sets what is told of a session whose command the cluster refused.
    pub(crate) fn on_refused(&self, f: impl Fn(ClientId) + Send + Sync + 'static) {
        let _ = self.on_refused.set(Box::new(f));
    }

    /// The session's connection here has closed: what its refused commands held goes on.
    pub(crate) fn unhold(&self, client_id: &ClientId) {
        // Under the same lock as every hold for a surrendered session (`hold`), so that no
        // hold is added after this and left behind.
        let mut surrendered = lock(&self.surrendered);
        surrendered.remove(client_id);
        let mut tickets = lock(&self.tickets);
        if let Some(held) = lock(&self.holds).remove(client_id) {
            for p in tickets
                .pending
                .iter_mut()
                .filter(|p| held.contains(&p.ticket))
            {
                p.held = false;
            }
        }
        drop(surrendered);
        self.advance(&mut tickets);
    }

    /// How a batch of proposals ended: called by the proposer, in order.
    pub(crate) fn settled(&self, settled: Settled) {
        let mut refused: Vec<ClientId> = Vec::new();
        let mut tickets = lock(&self.tickets);
        let by_ticket: Vec<(u64, Option<(ClientId, u64)>)> = {
            let mut sessions = lock(&self.session_tickets);
            (settled.first..=settled.last)
                .map(|t| (t, sessions.remove(&t)))
                .collect()
        };
        // Learned this late, a commit may have come before another node's claim of the
        // session, which that node could have answered since (it waits `LEASE` from the
        // claim, which came after this batch was proposed): what waits for it is not sent.
        let late = settled.proposed.elapsed() > LATE_COMMIT;
        match settled.result {
            Ok(outcomes) => {
                let mut holds = lock(&self.holds);
                for ((raft, client), outcome) in by_ticket.into_iter().zip(outcomes) {
                    let Some((client, epoch)) = client else {
                        continue;
                    };
                    tracing::trace!(client_id = %client, epoch, raft, ?outcome, "session command settled");
                    let why = match outcome {
                        Outcome::Rejected(r) => r.to_string(),
                        _ if late => "committed too late to answer for".to_owned(),
                        _ => continue,
                    };
                    if self.owned(&client).is_some_and(|now| now > epoch) {
                        // Sent under an epoch this node itself moved past (a clean start
                        // claimed here): the session here is another one already.
                        continue;
                    }
                    // The session moved on (its new owner has it, and this node's change was
                    // fenced off), or may have. What depended on the change waits until this
                    // node has let the session go (its connection closed), then goes nowhere.
                    tracing::debug!(client_id = %client, reason = %why, "a session command was refused");
                    for p in tickets
                        .pending
                        .iter_mut()
                        .filter(|p| p.raft_first <= raft && raft <= p.raft)
                    {
                        p.held = true;
                        holds.entry(client.clone()).or_default().push(p.ticket);
                    }
                    if !refused.contains(&client) {
                        refused.push(client);
                    }
                }
                tickets.raft_committed = tickets.raft_committed.max(settled.last);
            }
            Err(reason) => {
                tracing::warn!(%reason, first = settled.first, last = settled.last, "cluster proposal lost");
                tickets.raft_committed = tickets.raft_committed.max(settled.last);
                let (first, last) = (settled.first, settled.last);
                for p in tickets
                    .pending
                    .iter_mut()
                    .filter(|p| p.raft != 0 && p.raft_first <= last && first <= p.raft)
                {
                    p.lost = true;
                }
            }
        }
        self.advance(&mut tickets);
        drop(tickets);
        if let Some(tell) = self.on_refused.get() {
            for client in refused {
                tell(client);
            }
        }
    }

    /// The session is this node's, under `epoch`, from now on; built from a replicated
    /// session whose next queue number was `from_seq`.
    pub(crate) fn own(&self, client_id: &ClientId, epoch: u64, from_seq: u64) {
        lock(&self.owned).insert(
            client_id.clone(),
            Owned {
                epoch,
                messages: HashMap::new(),
                from_seq,
                fence: None,
            },
        );
    }

    /// The session, held here under `old`, is this node's under `epoch` now (a claim of its
    /// own): what it knows of the session's messages stays. Held under another claim, or let
    /// go meanwhile, it is left alone.
    pub(crate) fn renew(&self, client_id: &ClientId, old: u64, epoch: u64) {
        if let Some(o) = lock(&self.owned).get_mut(client_id) {
            if o.epoch == old {
                o.epoch = epoch;
                o.fence = None;
            }
        }
    }

    /// The session is no longer this node's (another node claimed it): the claim under
    /// `epoch`, or whichever it held (`None`). Until [`ClusterStorage::unhold`], what is
    /// recorded for it is held. Returns the epoch of the claim it let go, if it held one.
    pub(crate) fn disown(&self, client_id: &ClientId, epoch: Option<u64>) -> Option<u64> {
        let mut owned = lock(&self.owned);
        let held = owned.get(client_id).map(|o| o.epoch)?;
        if epoch.is_some_and(|e| e != held) {
            return None;
        }
        owned.remove(client_id);
        lock(&self.surrendered).insert(client_id.clone());
        Some(held)
    }

    /// Whether what is recorded for the session is held (see [`ClusterStorage::disown`]).
    pub(crate) fn is_surrendered(&self, client_id: &ClientId) -> bool {
        lock(&self.surrendered).contains(client_id)
    }

    /// If the session is surrendered, a ticket held until [`ClusterStorage::unhold`] for it.
    fn hold(&self, client_id: &ClientId) -> Option<Ticket> {
        let surrendered = lock(&self.surrendered);
        if !surrendered.contains(client_id) {
            return None;
        }
        let mut tickets = lock(&self.tickets);
        let ticket = tickets.push(Ticket::NONE, (0, 0), false, true);
        lock(&self.holds)
            .entry(client_id.clone())
            .or_default()
            .push(ticket);
        Some(Ticket::new(ticket))
    }

    /// Whether a message queued for the session under `epoch` with queue number `seq`
    /// is to be delivered here: the node owns the session under that claim or a later one
    /// of its own, and did not read the message when it built the session.
    pub(crate) fn delivers(&self, client_id: &ClientId, epoch: u64, seq: u64) -> bool {
        lock(&self.owned)
            .get(client_id)
            .is_some_and(|o| o.epoch >= epoch && seq >= o.from_seq)
    }

    /// The message queued under `seq` was handed to the session here: it and everything
    /// queued before it are not handed again ([`ClusterStorage::owned_sessions`]).
    pub(crate) fn handed(&self, client_id: &ClientId, seq: u64) {
        if let Some(o) = lock(&self.owned).get_mut(client_id) {
            o.from_seq = o.from_seq.max(seq.saturating_add(1));
        }
    }

    /// Every session this node owns: its client id, the epoch of its claim, and the first
    /// queue number not handed to it yet.
    pub(crate) fn owned_sessions(&self) -> Vec<(ClientId, u64, u64)> {
        lock(&self.owned)
            .iter()
            .map(|(id, o)| (id.clone(), o.epoch, o.from_seq))
            .collect()
    }

    /// The epoch under which this node owns the session, if it does.
    pub(crate) fn owned(&self, client_id: &ClientId) -> Option<u64> {
        lock(&self.owned).get(client_id).map(|o| o.epoch)
    }

    /// Remembers that the message routed to the session under `store_seq` is `id` in the
    /// cluster (it came from there: nothing to record).
    pub(crate) fn known(&self, client_id: &ClientId, store_seq: u64, id: MessageId) {
        if let Some(o) = lock(&self.owned).get_mut(client_id) {
            o.messages.insert(store_seq, id);
        }
    }

    /// Records a change to a session: held while the session is surrendered, as session
    /// commands while the cluster owns it (nothing, when the cluster has no record of it),
    /// else in the local store through `local`.
    fn session(
        &self,
        client_id: &ClientId,
        change: Change<'_>,
        local: impl FnOnce(&dyn Storage) -> Ticket,
    ) -> Ticket {
        if let Some(held) = self.hold(client_id) {
            return held;
        }
        match self.commands(client_id, change) {
            Some(commands) => self.record(Ticket::NONE, commands),
            None if self.owned(client_id).is_some() => Ticket::NONE,
            None => {
                // Let go since the first look (`disown` marks it surrendered before it lets
                // go of `owned`): held, not written here as a session of this node's.
                if let Some(held) = self.hold(client_id) {
                    tracing::debug!(client_id = %client_id, "let go while recording: held");
                    return held;
                }
                tracing::trace!(client_id = %client_id, "recorded in the local store");
                let ticket = local(&*self.local);
                self.record(ticket, Vec::new())
            }
        }
    }

    /// What a PUBLISH to a session the cluster owns waits for before it leaves: a
    /// confirmation, recorded less than [`FENCE_FRESH`] ago, that the session is still this
    /// node's (an empty `SessionProgress` under its epoch, refused once another node has
    /// claimed it). A node that was paused or cut off may apply a message queued under its
    /// claim after another node took the session over, and its client got CONNACK there;
    /// without the fence it would deliver that message on the old connection. With it, the
    /// PUBLISH waits for a confirmation the cluster refuses (or learned too late to answer
    /// for: [`LATE_COMMIT`]), and the session is let go instead. A confirmation committed
    /// before the claim was recorded before it, so what goes out under it leaves within
    /// [`FENCE_FRESH`] or [`LATE_COMMIT`] of the claim, before the new owner's lease ends.
    fn fence(&self, client_id: &ClientId) -> Fence {
        let held = |ticket| Fence {
            ticket,
            until: None,
        };
        if let Some(ticket) = self.hold(client_id) {
            return held(ticket);
        }
        let Some(node) = self.node.get() else {
            return Fence::default();
        };
        // Tokio's clock, as the proposer's (`Settled::proposed`).
        let now = tokio::time::Instant::now();
        let fence = |at: tokio::time::Instant, ticket| Fence {
            ticket,
            // What is written later than `LATE_COMMIT` after the confirmation may come after
            // a claim whose new owner no longer waits for this node.
            until: Some((at + LATE_COMMIT).into_std()),
        };
        let epoch = {
            let owned = lock(&self.owned);
            let Some(o) = owned.get(client_id) else {
                return Fence::default();
            };
            if let Some((at, ticket)) = o.fence {
                if now.duration_since(at) < FENCE_FRESH {
                    return fence(at, Ticket::new(ticket));
                }
            }
            o.epoch
        };
        let ticket = self.record(
            Ticket::NONE,
            vec![Command::SessionProgress {
                client_id: client_id.as_str().to_owned(),
                node: node.id,
                epoch,
                steps: Vec::new(),
            }],
        );
        if let Some(o) = lock(&self.owned).get_mut(client_id) {
            if o.epoch == epoch {
                o.fence = Some((now, ticket.get()));
            }
        }
        fence(now, ticket)
    }

    /// The `Publish` of a QoS 1 or 2 publication, once the node has started.
    fn publish_command(
        &self,
        message: &Message,
        from: Option<&ClientId>,
        counter: u64,
    ) -> Option<Command> {
        let node = self.node.get()?;
        Some(Command::Publish {
            id: MessageId {
                node: node.id,
                incarnation: node.incarnation,
                counter,
            },
            message: stored_message(message),
            from: from.map(|c| c.as_str().to_owned()),
            max_queued: self.max_queued,
        })
    }

    /// The command that sets (or, for an empty payload, deletes) a retained message in the
    /// cluster, once the node has started: every node serves it from there.
    fn retain_command(&self, message: &Message) -> Option<Command> {
        self.node.get()?;
        let topic = message.topic.as_str().to_owned();
        if message.payload.is_empty() {
            return Some(Command::DeleteRetained { topic });
        }
        let stored = stored_message(message);
        Some(Command::SetRetained {
            topic,
            message: Retained {
                payload: stored.payload,
                qos: stored.qos,
                properties: stored.properties,
            },
        })
    }

    /// The session commands for a change to `client_id`, if the cluster owns it.
    fn commands(&self, client_id: &ClientId, change: Change<'_>) -> Option<Vec<Command>> {
        let node = self.node.get()?;
        let mut owned = lock(&self.owned);
        let o = owned.get_mut(client_id)?;
        let epoch = o.epoch;
        let progress = |steps: Vec<Step>| Command::SessionProgress {
            client_id: client_id.as_str().to_owned(),
            node: node.id,
            epoch,
            steps,
        };
        let commands = match change {
            Change::Record(record) => {
                let subscriptions = record
                    .subscriptions
                    .iter()
                    .map(|(f, options, id)| {
                        (
                            f.as_str().to_owned(),
                            mqttd_cluster::session::SubscriptionOptions {
                                qos: options.qos as u8,
                                no_local: options.no_local,
                                retain_as_published: options.retain_as_published,
                                identifier: id.map(|i| i.get()),
                            },
                        )
                    })
                    .collect();
                let will = record.will.as_ref().map(|w| StoredWill {
                    message: stored_will(&w.will),
                    delay_secs: w.delay,
                });
                let expires_at_ms = record
                    .disconnected_at
                    .map(|at| millis(at).saturating_add(u64::from(record.expiry_interval) * 1000));
                let expiry = Command::SetSessionExpiry {
                    interval_secs: Some(record.expiry_interval),
                    client_id: client_id.as_str().to_owned(),
                    node: node.id,
                    epoch,
                    // A session that never expires (`u32::MAX`) has no expiry.
                    expires_at_ms: expires_at_ms.filter(|_| record.expiry_interval != u32::MAX),
                };
                vec![
                    progress(vec![Step::Subscriptions(subscriptions), Step::Will(will)]),
                    expiry,
                ]
            }
            Change::Remove => {
                owned.remove(client_id);
                vec![Command::DropSession {
                    client_id: client_id.as_str().to_owned(),
                    node: node.id,
                    epoch,
                }]
            }
            Change::Clear => {
                o.messages.clear();
                vec![progress(vec![Step::Clear])]
            }
            Change::Routed(delivery) => {
                let seq = delivery.store_seq?;
                if o.messages.contains_key(&seq) {
                    // It came from the cluster, which holds it already.
                    return Some(Vec::new());
                }
                let id = MessageId {
                    node: node.id,
                    incarnation: node.incarnation,
                    counter: seq,
                };
                o.messages.insert(seq, id);
                vec![Command::Enqueue {
                    id,
                    message: stored_message(&delivery.message),
                    targets: vec![(client_id.as_str().to_owned(), delivery.qos as u8)],
                    max_queued: self.max_queued,
                }]
            }
            Change::Flow(seq, packet_id, state) => {
                let Some(id) = o.messages.get(&seq).copied() else {
                    tracing::debug!(client_id = %client_id, seq, %packet_id, ?state, "flow of a message the cluster does not know");
                    return None;
                };
                let packet_id = packet_id.get();
                vec![progress(vec![match state {
                    OutboundState::PublishSent => Step::SentId { id, packet_id },
                    OutboundState::ReleaseSent => Step::Received { packet_id },
                }])]
            }
            Change::Done(delivery) => {
                let id = o.messages.remove(&delivery.store_seq?)?;
                vec![progress(vec![Step::Forget { id }])]
            }
            Change::PendingRelease(packet_id, pending) => {
                let packet_id = packet_id.get();
                vec![progress(vec![if pending {
                    Step::InboundReceived { packet_id }
                } else {
                    Step::InboundReleased { packet_id }
                }])]
            }
        };
        Some(commands)
    }

    /// Records a change whose local part has `local` and whose Raft part is `commands`;
    /// returns the ticket that covers both.
    fn record(&self, local: Ticket, commands: Vec<Command>) -> Ticket {
        let mut tickets = lock(&self.tickets);
        let (raft_first, raft) = self.propose(commands);
        if local.is_none() && raft == 0 {
            return Ticket::NONE;
        }
        let ticket = tickets.push(local, (raft_first, raft), false, false);
        self.advance(&mut tickets);
        Ticket::new(ticket)
    }

    /// Hands `commands` to the proposer; returns the proposer's tickets of the first and the
    /// last (0 and 0: none).
    fn propose(&self, commands: Vec<Command>) -> (u64, u64) {
        let Some(node) = self.node.get() else {
            return (0, 0);
        };
        // Held across the recording, so that the proposer cannot settle a session command
        // before it is known here as one.
        let mut sessions = lock(&self.session_tickets);
        let (mut first, mut last) = (0, 0);
        for command in commands {
            let session = match &command {
                Command::SessionProgress {
                    client_id, epoch, ..
                }
                | Command::SetSessionExpiry {
                    client_id, epoch, ..
                } => ClientId::try_from(client_id.as_str())
                    .ok()
                    .map(|c| (c, *epoch)),
                _ => None,
            };
            if let Command::SessionProgress {
                client_id,
                epoch,
                steps,
                ..
            } = &command
            {
                tracing::trace!(client_id, epoch, ?steps, "session steps recorded");
            }
            let ticket = node.proposer.record(command);
            if let Some(client) = session {
                sessions.insert(ticket, client);
            }
            if first == 0 {
                first = ticket;
            }
            last = ticket;
        }
        (first, last)
    }

    /// Moves the watermark past every change both of whose parts are durable.
    fn advance(&self, tickets: &mut Tickets) {
        let local = *self.local.watermark().borrow();
        let mut durable = None;
        let mut lost = false;
        while let Some(front) = tickets.pending.front() {
            if front.lost {
                lost = true;
                break;
            }
            if front.open || front.held {
                break;
            }
            if !front.local.is_none() && local.lost(front.local) {
                lost = true;
                break;
            }
            let local_done = front.local.is_none() || local.covers(front.local);
            let raft_done = front.raft == 0 || front.raft <= tickets.raft_committed;
            if !(local_done && raft_done) {
                break;
            }
            durable = Some(front.ticket);
            tickets.pending.pop_front();
        }
        if lost {
            // Conservative: whatever waits now is lost; what is recorded next is not.
            let last = tickets.last;
            tickets.pending.clear();
            self.watermark.send_modify(|w| {
                if let Some(d) = durable {
                    w.durable = w.durable.max(d);
                }
                let _ = w.fail();
                w.recover(last);
            });
            return;
        }
        if let Some(d) = durable {
            self.watermark.send_if_modified(|w| {
                let moved = d > w.durable;
                w.durable = w.durable.max(d);
                moved
            });
        }
    }
}

/// A change to a session, as the broker records it.
enum Change<'a> {
    Record(&'a SessionRecord),
    Remove,
    Clear,
    Routed(&'a Delivery),
    Flow(u64, PacketId, OutboundState),
    Done(&'a Delivery),
    PendingRelease(PacketId, bool),
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The message as the cluster stores it.
pub(crate) fn stored_message(message: &Message) -> StoredMessage {
    let now = crate::clock::now();
    let p = &message.properties;
    StoredMessage {
        topic: message.topic.as_str().to_owned(),
        payload: message.payload.to_vec(),
        qos: message.qos as u8,
        retain: message.retain,
        properties: StoredProperties {
            payload_format: p.payload_format_indicator.map(u8::from),
            expires_at_ms: message
                .remaining_expiry(now)
                .map(|secs| millis(SystemTime::now()).saturating_add(u64::from(secs) * 1000)),
            content_type: p.content_type.as_ref().map(|s| s.as_str().to_owned()),
            response_topic: p.response_topic.as_ref().map(|s| s.as_str().to_owned()),
            correlation_data: p.correlation_data.as_ref().map(|b| b.to_vec()),
            user_properties: p
                .user_properties
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.as_str().to_owned()))
                .collect(),
        },
    }
}

/// A will as the cluster stores it: its expiry interval starts when it is published, so
/// none is kept (as before the cluster published wills itself).
fn stored_will(will: &mqttd_proto::Will) -> StoredMessage {
    let mut stored = stored_message(&Message::from_will(will.clone(), crate::clock::now()));
    stored.properties.expires_at_ms = None;
    stored
}

/// The local retained message for one the cluster holds under `topic` (see [`to_message`]).
pub(crate) fn retained_message(topic: &str, r: &Retained) -> Option<Message> {
    to_message(&StoredMessage {
        topic: topic.to_owned(),
        payload: r.payload.clone(),
        qos: r.qos,
        retain: true,
        properties: r.properties.clone(),
    })
}

/// The local message for one the cluster stored, or `None` if it is not valid MQTT (the
/// cluster only holds what nodes running this code stored).
pub(crate) fn to_message(m: &StoredMessage) -> Option<Message> {
    let p = &m.properties;
    let mut message = crate::forwarding::message_from(
        &m.topic,
        m.payload.clone().into(),
        m.qos,
        m.retain,
        crate::forwarding::Strings {
            content_type: p.content_type.as_deref(),
            response_topic: p.response_topic.as_deref(),
            user_properties: &p.user_properties,
        },
    )?;
    message.properties.payload_format_indicator = p.payload_format.map(|f| f != 0);
    message.properties.correlation_data = p.correlation_data.clone().map(Into::into);
    if let Some(at) = p.expires_at_ms {
        let left = at.saturating_sub(millis(SystemTime::now()));
        message.expires_at = Some(crate::clock::now() + Duration::from_millis(left));
    }
    Some(message)
}

impl Storage for ClusterStorage {
    fn recover(&self) -> Result<Recovered, StorageError> {
        self.local.recover()
    }

    fn retain(&self, message: &Arc<Message>) -> Ticket {
        let local = self.local.retain(message);
        self.record(local, self.retain_command(message).into_iter().collect())
    }

    fn save_session(&self, record: &SessionRecord) -> Ticket {
        self.session(&record.client_id, Change::Record(record), |l| {
            l.save_session(record)
        })
    }

    fn remove_session(&self, client_id: &ClientId) -> Ticket {
        self.session(client_id, Change::Remove, |l| l.remove_session(client_id))
    }

    fn remove_messages(&self, client_id: &ClientId) -> Ticket {
        self.session(client_id, Change::Clear, |l| l.remove_messages(client_id))
    }

    fn store_delivery(&self, client_id: &ClientId, delivery: &Delivery) -> Ticket {
        self.session(client_id, Change::Routed(delivery), |l| {
            l.store_delivery(client_id, delivery)
        })
    }

    fn delivery_flow(
        &self,
        client_id: &ClientId,
        store_seq: u64,
        packet_id: PacketId,
        state: OutboundState,
    ) -> Ticket {
        self.session(client_id, Change::Flow(store_seq, packet_id, state), |l| {
            l.delivery_flow(client_id, store_seq, packet_id, state)
        })
    }

    fn delivery_done(&self, client_id: &ClientId, delivery: &Delivery) -> Ticket {
        self.session(client_id, Change::Done(delivery), |l| {
            l.delivery_done(client_id, delivery)
        })
    }

    fn pending_release(&self, client_id: &ClientId, packet_id: PacketId, pending: bool) -> Ticket {
        self.session(client_id, Change::PendingRelease(packet_id, pending), |l| {
            l.pending_release(client_id, packet_id, pending)
        })
    }

    fn delivery_fence(&self, client_id: &ClientId) -> Fence {
        self.fence(client_id)
    }

    fn publish(&self, message: &Message, from: Option<&ClientId>, counter: u64) -> Ticket {
        match self.publish_command(message, from, counter) {
            Some(command) => self.record(Ticket::NONE, vec![command]),
            None => Ticket::NONE,
        }
    }

    fn open_batch(&self) -> Option<Box<dyn StorageBatch + '_>> {
        let mut tickets = lock(&self.tickets);
        let ticket = tickets.push(Ticket::NONE, (0, 0), true, false);
        Some(Box::new(ClusterBatch {
            storage: self,
            held: Vec::new(),
            local: Some(self.local.batch()),
            commands: Vec::new(),
            ticket,
            done: false,
        }))
    }

    fn watermark(&self) -> watch::Receiver<Watermark> {
        self.watermark.subscribe()
    }

    fn is_durable(&self) -> bool {
        // Raft commits are waited for even when the local store keeps nothing.
        true
    }

    fn close(&self) {
        self.local.close();
    }
}

/// A batch: the local store's (atomic if it has them) and the session commands, under the
/// ticket taken when it was opened.
struct ClusterBatch<'a> {
    storage: &'a ClusterStorage,
    /// Surrendered sessions it recorded for: its ticket is held for each.
    held: Vec<ClientId>,
    /// Until the commit: the local store's batch.
    local: Option<Batch<'a>>,
    commands: Vec<Command>,
    ticket: u64,
    done: bool,
}

impl ClusterBatch<'_> {
    /// Records a change to a session, as [`ClusterStorage::session`] does.
    fn session(
        &mut self,
        client_id: &ClientId,
        change: Change<'_>,
        local: impl FnOnce(&mut Batch<'_>),
    ) {
        let hold = |batch: &mut Self| {
            if !batch.held.contains(client_id) {
                batch.held.push(client_id.clone());
            }
        };
        if self.storage.is_surrendered(client_id) {
            return hold(self);
        }
        match self.storage.commands(client_id, change) {
            Some(commands) => self.commands.extend(commands),
            None if self.storage.owned(client_id).is_some() => {}
            // Let go since the first look (see `ClusterStorage::session`).
            None if self.storage.is_surrendered(client_id) => hold(self),
            None => {
                if let Some(l) = &mut self.local {
                    local(l);
                }
            }
        }
    }

    /// Proposes the batch's commands and fills in its entry, under the ticket lock, so that
    /// no settlement comes before the entry knows its proposer tickets. Returns the last.
    fn close(&mut self, local: Ticket, commands: Vec<Command>) -> u64 {
        self.done = true;
        // Lock order as in `ClusterStorage::hold`: a session released meanwhile holds nothing.
        let surrendered = lock(&self.storage.surrendered);
        self.held.retain(|c| surrendered.contains(c));
        let mut tickets = lock(&self.storage.tickets);
        let (raft_first, raft) = self.storage.propose(commands);
        if let Some(p) = tickets.pending.iter_mut().find(|p| p.ticket == self.ticket) {
            p.local = local;
            p.raft_first = raft_first;
            p.raft = raft;
            p.open = false;
            if !self.held.is_empty() {
                p.held = true;
                let mut holds = lock(&self.storage.holds);
                for client in self.held.drain(..) {
                    holds.entry(client).or_default().push(self.ticket);
                }
            }
        }
        drop(surrendered);
        self.storage.advance(&mut tickets);
        raft
    }
}

impl StorageBatch for ClusterBatch<'_> {
    fn retain(&mut self, message: &Arc<Message>) {
        if let Some(l) = &mut self.local {
            let _ = l.retain(message);
        }
        self.commands.extend(self.storage.retain_command(message));
    }

    fn save_session(&mut self, record: &SessionRecord) {
        self.session(&record.client_id, Change::Record(record), |l| {
            let _ = l.save_session(record);
        });
    }

    fn remove_session(&mut self, client_id: &ClientId) {
        self.session(client_id, Change::Remove, |l| {
            let _ = l.remove_session(client_id);
        });
    }

    fn remove_messages(&mut self, client_id: &ClientId) {
        self.session(client_id, Change::Clear, |l| {
            let _ = l.remove_messages(client_id);
        });
    }

    fn store_delivery(&mut self, client_id: &ClientId, delivery: &Delivery) {
        self.session(client_id, Change::Routed(delivery), |l| {
            let _ = l.store_delivery(client_id, delivery);
        });
    }

    fn delivery_flow(
        &mut self,
        client_id: &ClientId,
        store_seq: u64,
        packet_id: PacketId,
        state: OutboundState,
    ) {
        self.session(client_id, Change::Flow(store_seq, packet_id, state), |l| {
            let _ = l.delivery_flow(client_id, store_seq, packet_id, state);
        });
    }

    fn delivery_done(&mut self, client_id: &ClientId, delivery: &Delivery) {
        self.session(client_id, Change::Done(delivery), |l| {
            let _ = l.delivery_done(client_id, delivery);
        });
    }

    fn pending_release(&mut self, client_id: &ClientId, packet_id: PacketId, pending: bool) {
        self.session(client_id, Change::PendingRelease(packet_id, pending), |l| {
            let _ = l.pending_release(client_id, packet_id, pending);
        });
    }

    fn publish(&mut self, message: &Message, from: Option<&ClientId>, counter: u64) {
        self.commands
            .extend(self.storage.publish_command(message, from, counter));
    }

    fn ticket(&self) -> Ticket {
        Ticket::new(self.ticket)
    }

    fn commit(mut self: Box<Self>) -> Ticket {
        let local = self.local.take().map_or(Ticket::NONE, Batch::commit);
        let commands = std::mem::take(&mut self.commands);
        let held = !self.held.is_empty();
        let raft = self.close(local, commands);
        if local.is_none() && raft == 0 && !held {
            Ticket::NONE
        } else {
            Ticket::new(self.ticket)
        }
    }
}

impl Drop for ClusterBatch<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Dropped without a commit: nothing of it is recorded (the local batch is
            // discarded with it), its ticket holds nothing up.
            self.held.clear();
            let _ = self.close(Ticket::NONE, Vec::new());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use mqttd_cluster::Rejection;
    use tokio::sync::Semaphore;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::storage::MemoryStorage;

    fn client(id: &str) -> ClientId {
        ClientId::try_from(id).expect("client id")
    }

    fn record(id: &str) -> SessionRecord {
        SessionRecord {
            client_id: client(id),
            expiry_interval: 60,
            subscriptions: Vec::new(),
            will: None,
            disconnected_at: None,
        }
    }

    fn watermark(storage: &ClusterStorage) -> Watermark {
        *storage.watermark().borrow()
    }

    async fn until(storage: &ClusterStorage, what: &str, done: impl Fn(Watermark) -> bool) {
        for _ in 0..100_000 {
            if done(watermark(storage)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("{what}: {:?}", watermark(storage));
    }

    /// A cluster storage whose proposer commits a batch per permit of `gate` (and fails while
    /// `failing`), refusing session commands under epoch 1 (stale: another node claimed the
    /// session since). What the storage was told of refusals, in order.
    fn gated(
        tasks: &TaskTracker,
        stop: &CancellationToken,
        gate: &Arc<Semaphore>,
        failing: &Arc<AtomicBool>,
    ) -> (Arc<ClusterStorage>, Arc<Mutex<Vec<ClientId>>>) {
        let storage = ClusterStorage::new(Arc::new(MemoryStorage::default()), 100);
        let (gate, failing) = (gate.clone(), failing.clone());
        let settling = Arc::downgrade(&storage);
        let proposer = Proposer::start(
            tasks,
            stop.clone(),
            (1, 1),
            move |command| {
                let (gate, failing) = (gate.clone(), failing.clone());
                Box::pin(async move {
                    if failing.load(Ordering::SeqCst) {
                        return Err("no leader".to_owned());
                    }
                    gate.acquire().await.map_err(|e| e.to_string())?.forget();
                    let Command::Sequenced {
                        commands: batch, ..
                    } = command
                    else {
                        return Err("not a batch".to_owned());
                    };
                    let outcomes = batch
                        .iter()
                        .map(|c| match c {
                            Command::SessionProgress { epoch: 1, .. }
                            | Command::SetSessionExpiry { epoch: 1, .. } => {
                                Outcome::Rejected(Rejection::NoSession)
                            }
                            _ => Outcome::Done,
                        })
                        .collect();
                    Ok(Outcome::Batch(outcomes))
                })
            },
            move |settled| {
                if let Some(s) = settling.upgrade() {
                    s.settled(settled);
                }
            },
        );
        storage.attach(1, 1, proposer);
        let refused = Arc::new(Mutex::new(Vec::new()));
        {
            let refused = refused.clone();
            storage.on_refused(move |c| lock(&refused).push(c));
        }
        (storage, refused)
    }

    /// A ticket is durable once Raft committed its commands, in order; a command the cluster
    /// refused holds what depended on it (and everything after) until its session's
    /// connection here has stopped; a proposal that keeps failing loses its tickets; a
    /// commit learned too late is held as a refusal is.
    #[tokio::test(start_paused = true)]
    async fn tickets_follow_raft_commits_refusals_and_losses() {
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let gate = Arc::new(Semaphore::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let (storage, refused) = gated(&tasks, &stop, &gate, &failing);

        // Not durable before the commit, durable after it.
        storage.own(&client("c"), 2, 0);
        let first = storage.save_session(&record("c"));
        assert!(!first.is_none());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!watermark(&storage).covers(first), "before the commit");
        gate.add_permits(100);
        until(&storage, "the commit", |w| w.covers(first)).await;
        // A session the cluster does not own goes to the local store (here: nothing to
        // wait for).
        assert!(storage.save_session(&record("local")).is_none());

        // Refused: held, and what comes after with it, until the session is let go here.
        storage.own(&client("old"), 1, 0);
        let refused_ticket = storage.save_session(&record("old"));
        let later = storage.save_session(&record("c"));
        until(&storage, "the refusal told", |_| !lock(&refused).is_empty()).await;
        assert_eq!(*lock(&refused), [client("old")]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let w = watermark(&storage);
        assert!(!w.covers(refused_ticket) && !w.covers(later), "{w:?}");
        // Let go (as the broker does once the connection stopped): what was held goes on,
        // and while surrendered, what the session records waits too.
        assert_eq!(storage.disown(&client("old"), Some(1)), Some(1));
        let while_surrendered = storage.save_session(&record("old"));
        storage.unhold(&client("old"));
        until(&storage, "released", |w| w.covers(later)).await;
        assert!(watermark(&storage).covers(while_surrendered));

        // A proposal that keeps failing loses its tickets; the next ones are durable again.
        failing.store(true, Ordering::SeqCst);
        let lost = storage.save_session(&record("c"));
        until(&storage, "the loss", |w| w.lost(lost)).await;
        assert!(!watermark(&storage).covers(lost));
        failing.store(false, Ordering::SeqCst);
        let after = storage.save_session(&record("c"));
        until(&storage, "durable again", |w| w.covers(after)).await;

        // Committed, but learned later than `LATE_COMMIT` after it was proposed: another
        // node may have claimed the session and answered its client since, so what waits is
        // held as if refused, and the session is let go.
        let open = u32::try_from(gate.available_permits()).expect("permits");
        gate.acquire_many(open).await.expect("the gate").forget();
        let late = storage.save_session(&record("c"));
        tokio::time::sleep(LATE_COMMIT + Duration::from_secs(1)).await;
        gate.add_permits(1);
        until(&storage, "the late commit told", |_| {
            lock(&refused).len() == 2
        })
        .await;
        assert_eq!(lock(&refused)[1], client("c"));
        assert!(!watermark(&storage).covers(late), "not answered for");
        assert_eq!(storage.disown(&client("c"), None), Some(2));
        storage.unhold(&client("c"));
        until(&storage, "released", |w| w.covers(late)).await;

        stop.cancel();
        tasks.close();
        tasks.wait().await;
    }

    /// A message survives the trip into the cluster's form and back, properties included.
    /// A PUBLISH to a session the cluster owns waits for a confirmation that the session is
    /// still this node's, one per `FENCE_FRESH` at most; refused (another node claimed the
    /// session), it is held and the session let go; a session the cluster does not own has
    /// nothing to wait for.
    #[tokio::test(start_paused = true)]
    async fn a_publish_waits_for_a_fresh_confirmation_that_the_session_is_owned() {
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let gate = Arc::new(Semaphore::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let (storage, refused) = gated(&tasks, &stop, &gate, &failing);
        assert!(storage.delivery_fence(&client("local")).ticket.is_none());

        storage.own(&client("c"), 2, 0);
        let first = storage.delivery_fence(&client("c")).ticket;
        assert!(!first.is_none());
        // Within `FENCE_FRESH`, the same confirmation covers the next PUBLISH.
        assert_eq!(storage.delivery_fence(&client("c")).ticket, first);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!watermark(&storage).covers(first), "before the commit");
        gate.add_permits(1);
        until(&storage, "the confirmation", |w| w.covers(first)).await;
        assert_eq!(storage.delivery_fence(&client("c")).ticket, first);
        // Later, another.
        tokio::time::sleep(FENCE_FRESH).await;
        let second = storage.delivery_fence(&client("c")).ticket;
        assert!(second.get() > first.get());
        gate.add_permits(1);
        until(&storage, "the second confirmation", |w| w.covers(second)).await;

        // Claimed by another node (this node's epoch 1 is stale): held, and let go.
        storage.own(&client("old"), 1, 0);
        let stale = storage.delivery_fence(&client("old")).ticket;
        gate.add_permits(1);
        until(&storage, "the refusal told", |_| !lock(&refused).is_empty()).await;
        assert_eq!(*lock(&refused), [client("old")]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!watermark(&storage).covers(stale), "held");
        // While it is being let go, a PUBLISH waits until its connection has closed.
        assert_eq!(storage.disown(&client("old"), Some(1)), Some(1));
        let surrendered = storage.delivery_fence(&client("old")).ticket;
        assert!(!surrendered.is_none());
        storage.unhold(&client("old"));
        until(&storage, "released", |w| w.covers(surrendered)).await;
        stop.cancel();
    }

    #[test]
    fn a_message_comes_back_from_the_cluster_as_it_went() {
        let mut message = Message::new(
            mqttd_proto::TopicName::try_from("a/b").expect("topic"),
            b"payload".to_vec(),
            mqttd_proto::QoS::ExactlyOnce,
            true,
        );
        let s = |v: &str| mqttd_proto::MqttStr::try_from(v).expect("string");
        message.properties.payload_format_indicator = Some(true);
        message.properties.content_type = Some(s("text/plain"));
        message.properties.response_topic =
            Some(mqttd_proto::TopicName::try_from("re/ply").expect("topic"));
        message.properties.correlation_data = Some(b"corr".to_vec().into());
        message.properties.user_properties = vec![(s("k"), s("v"))];
        let back = to_message(&stored_message(&message)).expect("valid");
        assert_eq!(back.properties, message.properties);
        assert_eq!(
            (
                back.topic,
                back.payload,
                back.qos,
                back.retain,
                back.expires_at
            ),
            (
                message.topic,
                message.payload,
                message.qos,
                message.retain,
                None
            )
        );
    }
}
