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
use mqttd_cluster::{Command, NodeId, Outcome, Proposer, Settled};
use mqttd_proto::session::OutboundState;
use mqttd_proto::{ClientId, Delivery, Message, PacketId};
use tokio::sync::watch;

use crate::storage::{
    Recovered, SessionRecord, Storage, StorageBatch, StorageError, Ticket, Watermark,
};

/// What a session the cluster owns needs here.
#[derive(Debug)]
struct Owned {
    /// The epoch of this node's claim.
    epoch: u64,
    /// The identity in the cluster of each message routed to the session, by its local
    /// [`Delivery::store_seq`].
    messages: HashMap<u64, MessageId>,
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
    /// A proposal failed: the changes it held are lost.
    raft_lost: bool,
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
        match settled.result {
            Ok(outcomes) => {
                let mut holds = lock(&self.holds);
                for ((raft, client), outcome) in by_ticket.into_iter().zip(outcomes) {
                    let (Outcome::Rejected(r), Some((client, epoch))) = (outcome, client) else {
                        continue;
                    };
                    if self.owned(&client).is_some_and(|now| now > epoch) {
                        // Sent under an epoch this node itself moved past (a clean start
                        // claimed here): the session here is another one already.
                        continue;
                    }
                    // The session moved on: its new owner has it, and this node's change was
                    // fenced off. What depended on the change waits until this node has let
                    // the session go (its connection closed), then goes nowhere.
                    tracing::debug!(client_id = %client, reason = %r, "a session command was refused");
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
                tickets.raft_lost = true;
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

    /// The session is this node's, under `epoch`, from now on.
    pub(crate) fn own(&self, client_id: &ClientId, epoch: u64) {
        lock(&self.owned).insert(
            client_id.clone(),
            Owned {
                epoch,
                messages: HashMap::new(),
            },
        );
    }

    /// The session is no longer this node's (another node claimed it).
    /// Until [`ClusterStorage::unhold`], what is recorded for it is held.
    pub(crate) fn disown(&self, client_id: &ClientId, epoch: u64) -> bool {
        let mut owned = lock(&self.owned);
        if owned.get(client_id).is_some_and(|o| o.epoch == epoch) {
            owned.remove(client_id);
            lock(&self.surrendered).insert(client_id.clone());
            return true;
        }
        false
    }

    /// Whether what is recorded for the session is held (see [`ClusterStorage::disown`]).
    fn surrendered(&self, client_id: &ClientId) -> bool {
        lock(&self.surrendered).contains(client_id)
    }

    /// If the session is surrendered, a ticket held until [`ClusterStorage::unhold`] for it.
    fn hold(&self, client_id: &ClientId) -> Option<Ticket> {
        let surrendered = lock(&self.surrendered);
        if !surrendered.contains(client_id) {
            return None;
        }
        let mut tickets = lock(&self.tickets);
        tickets.last += 1;
        let ticket = tickets.last;
        tickets.pending.push_back(Pending {
            ticket,
            local: Ticket::NONE,
            raft_first: 0,
            raft: 0,
            open: false,
            held: true,
        });
        lock(&self.holds)
            .entry(client_id.clone())
            .or_default()
            .push(ticket);
        Some(Ticket::new(ticket))
    }

    /// The session stays this node's under a new claim of its own.
    pub(crate) fn renew(&self, client_id: &ClientId, epoch: u64) {
        let mut owned = lock(&self.owned);
        match owned.get_mut(client_id) {
            Some(o) => o.epoch = epoch,
            None => {
                owned.insert(
                    client_id.clone(),
                    Owned {
                        epoch,
                        messages: HashMap::new(),
                    },
                );
            }
        }
    }

    /// Whether the message `id` was routed to the session here already.
    pub(crate) fn knows(&self, client_id: &ClientId, id: MessageId) -> bool {
        lock(&self.owned)
            .get(client_id)
            .is_some_and(|o| o.messages.values().any(|m| *m == id))
    }

    /// The session is no longer this node's, whatever the epoch it held.
    pub(crate) fn disown_any(&self, client_id: &ClientId) {
        if lock(&self.owned).remove(client_id).is_some() {
            lock(&self.surrendered).insert(client_id.clone());
        }
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
                let id = *o.messages.get(&seq)?;
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
        tickets.last += 1;
        let ticket = tickets.last;
        tickets.pending.push_back(Pending {
            ticket,
            local,
            raft_first,
            raft,
            open: false,
            held: false,
        });
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
        let mut lost = tickets.raft_lost;
        while let Some(front) = tickets.pending.front() {
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
            tickets.raft_lost = false;
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

/// A will as the cluster stores it.
fn stored_will(will: &mqttd_proto::Will) -> StoredMessage {
    let p = &will.properties;
    StoredMessage {
        topic: will.topic.as_str().to_owned(),
        payload: will.payload.to_vec(),
        qos: will.qos as u8,
        retain: will.retain,
        properties: StoredProperties {
            payload_format: p.payload_format_indicator.map(u8::from),
            expires_at_ms: None,
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

/// The local message for one the cluster stored, or `None` if it is not valid MQTT (the
/// cluster only holds what nodes running this code stored).
pub(crate) fn to_message(m: &StoredMessage) -> Option<Message> {
    let s = |v: &str| mqttd_proto::MqttStr::try_from(v).ok();
    let topic = mqttd_proto::TopicName::new(s(&m.topic)?).ok()?;
    let qos = mqttd_proto::QoS::from_bits(m.qos)?;
    let p = &m.properties;
    let mut message = Message::new(topic, m.payload.clone(), qos, m.retain);
    message.properties.payload_format_indicator = p.payload_format.map(|f| f != 0);
    message.properties.content_type = match &p.content_type {
        Some(v) => Some(s(v)?),
        None => None,
    };
    message.properties.response_topic = match &p.response_topic {
        Some(v) => Some(mqttd_proto::TopicName::new(s(v)?).ok()?),
        None => None,
    };
    message.properties.correlation_data = p.correlation_data.clone().map(Into::into);
    message.properties.user_properties = p
        .user_properties
        .iter()
        .map(|(k, v)| Some((s(k)?, s(v)?)))
        .collect::<Option<_>>()?;
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
        self.record(local, Vec::new())
    }

    fn save_session(&self, record: &SessionRecord) -> Ticket {
        if let Some(held) = self.hold(&record.client_id) {
            return held;
        }
        match self.commands(&record.client_id, Change::Record(record)) {
            Some(commands) => self.record(Ticket::NONE, commands),
            None => {
                let local = self.local.save_session(record);
                self.record(local, Vec::new())
            }
        }
    }

    fn remove_session(&self, client_id: &ClientId) -> Ticket {
        if let Some(held) = self.hold(client_id) {
            return held;
        }
        match self.commands(client_id, Change::Remove) {
            Some(commands) => self.record(Ticket::NONE, commands),
            None => {
                let local = self.local.remove_session(client_id);
                self.record(local, Vec::new())
            }
        }
    }

    fn remove_messages(&self, client_id: &ClientId) -> Ticket {
        if let Some(held) = self.hold(client_id) {
            return held;
        }
        match self.commands(client_id, Change::Clear) {
            Some(commands) => self.record(Ticket::NONE, commands),
            None => {
                let local = self.local.remove_messages(client_id);
                self.record(local, Vec::new())
            }
        }
    }

    fn store_delivery(&self, client_id: &ClientId, delivery: &Delivery) -> Ticket {
        if let Some(held) = self.hold(client_id) {
            return held;
        }
        match self.commands(client_id, Change::Routed(delivery)) {
            Some(commands) => self.record(Ticket::NONE, commands),
            None => {
                let local = self.local.store_delivery(client_id, delivery);
                self.record(local, Vec::new())
            }
        }
    }

    fn delivery_flow(
        &self,
        client_id: &ClientId,
        store_seq: u64,
        packet_id: PacketId,
        state: OutboundState,
    ) -> Ticket {
        if let Some(held) = self.hold(client_id) {
            return held;
        }
        match self.commands(client_id, Change::Flow(store_seq, packet_id, state)) {
            Some(commands) => self.record(Ticket::NONE, commands),
            None if self.owned(client_id).is_some() => Ticket::NONE,
            None => {
                let local = self
                    .local
                    .delivery_flow(client_id, store_seq, packet_id, state);
                self.record(local, Vec::new())
            }
        }
    }

    fn delivery_done(&self, client_id: &ClientId, delivery: &Delivery) -> Ticket {
        if let Some(held) = self.hold(client_id) {
            return held;
        }
        match self.commands(client_id, Change::Done(delivery)) {
            Some(commands) => self.record(Ticket::NONE, commands),
            None if self.owned(client_id).is_some() => Ticket::NONE,
            None => {
                let local = self.local.delivery_done(client_id, delivery);
                self.record(local, Vec::new())
            }
        }
    }

    fn pending_release(&self, client_id: &ClientId, packet_id: PacketId, pending: bool) -> Ticket {
        if let Some(held) = self.hold(client_id) {
            return held;
        }
        match self.commands(client_id, Change::PendingRelease(packet_id, pending)) {
            Some(commands) => self.record(Ticket::NONE, commands),
            None => {
                let local = self.local.pending_release(client_id, packet_id, pending);
                self.record(local, Vec::new())
            }
        }
    }

    fn publish(&self, message: &Message, from: Option<&ClientId>, counter: u64) -> Ticket {
        let Some(node) = self.node.get() else {
            return Ticket::NONE;
        };
        let command = Command::Publish {
            id: MessageId {
                node: node.id,
                incarnation: node.incarnation,
                counter,
            },
            message: stored_message(message),
            from: from.map(|c| c.as_str().to_owned()),
            max_queued: self.max_queued,
        };
        self.record(Ticket::NONE, vec![command])
    }

    fn open_batch(&self) -> Option<Box<dyn StorageBatch + '_>> {
        let local = self.local.open_batch();
        let mut tickets = lock(&self.tickets);
        tickets.last += 1;
        let ticket = tickets.last;
        tickets.pending.push_back(Pending {
            ticket,
            local: Ticket::NONE,
            raft_first: 0,
            raft: 0,
            open: true,
            held: false,
        });
        Some(Box::new(ClusterBatch {
            storage: self,
            held: Vec::new(),
            local,
            direct: Ticket::NONE,
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

/// A batch: the local store's own (or its changes one by one) and the session commands,
/// under the ticket taken when it was opened.
struct ClusterBatch<'a> {
    storage: &'a ClusterStorage,
    /// Surrendered sessions it recorded for: its ticket is held for each.
    held: Vec<ClientId>,
    local: Option<Box<dyn StorageBatch + 'a>>,
    /// Without a local batch, the ticket covering the local changes made one by one.
    direct: Ticket,
    commands: Vec<Command>,
    ticket: u64,
    done: bool,
}

impl ClusterBatch<'_> {
    fn session(&mut self, client_id: &ClientId, change: Change<'_>, local: impl FnOnce(&mut Self)) {
        if self.hold_for(client_id) {
            return;
        }
        match self.storage.commands(client_id, change) {
            Some(commands) => self.commands.extend(commands),
            None => local(self),
        }
    }

    /// Whether the session is surrendered: then the batch's ticket is held for it.
    fn hold_for(&mut self, client_id: &ClientId) -> bool {
        if !self.storage.surrendered(client_id) {
            return false;
        }
        if !self.held.contains(client_id) {
            self.held.push(client_id.clone());
        }
        true
    }

    /// Fills in the batch's entry: its parts are known now.
    fn close(&mut self, local: Ticket, (raft_first, raft): (u64, u64)) {
        self.done = true;
        // Lock order as in `ClusterStorage::hold`: a session released meanwhile holds nothing.
        let surrendered = lock(&self.storage.surrendered);
        self.held.retain(|c| surrendered.contains(c));
        let mut tickets = lock(&self.storage.tickets);
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
    }
}

impl StorageBatch for ClusterBatch<'_> {
    fn retain(&mut self, message: &Arc<Message>) {
        match &mut self.local {
            Some(b) => b.retain(message),
            None => self.direct.merge(self.storage.local.retain(message)),
        }
    }

    fn save_session(&mut self, record: &SessionRecord) {
        self.session(
            &record.client_id,
            Change::Record(record),
            |b| match &mut b.local {
                Some(l) => l.save_session(record),
                None => b.direct.merge(b.storage.local.save_session(record)),
            },
        );
    }

    fn remove_session(&mut self, client_id: &ClientId) {
        self.session(client_id, Change::Remove, |b| match &mut b.local {
            Some(l) => l.remove_session(client_id),
            None => b.direct.merge(b.storage.local.remove_session(client_id)),
        });
    }

    fn remove_messages(&mut self, client_id: &ClientId) {
        self.session(client_id, Change::Clear, |b| match &mut b.local {
            Some(l) => l.remove_messages(client_id),
            None => b.direct.merge(b.storage.local.remove_messages(client_id)),
        });
    }

    fn store_delivery(&mut self, client_id: &ClientId, delivery: &Delivery) {
        self.session(client_id, Change::Routed(delivery), |b| {
            match &mut b.local {
                Some(l) => l.store_delivery(client_id, delivery),
                None => b
                    .direct
                    .merge(b.storage.local.store_delivery(client_id, delivery)),
            }
        });
    }

    fn delivery_flow(
        &mut self,
        client_id: &ClientId,
        store_seq: u64,
        packet_id: PacketId,
        state: OutboundState,
    ) {
        if self.hold_for(client_id) {
            return;
        }
        if self.storage.owned(client_id).is_some() {
            if let Some(c) = self
                .storage
                .commands(client_id, Change::Flow(store_seq, packet_id, state))
            {
                self.commands.extend(c);
            }
            return;
        }
        match &mut self.local {
            Some(l) => l.delivery_flow(client_id, store_seq, packet_id, state),
            None => self.direct.merge(
                self.storage
                    .local
                    .delivery_flow(client_id, store_seq, packet_id, state),
            ),
        }
    }

    fn delivery_done(&mut self, client_id: &ClientId, delivery: &Delivery) {
        if self.hold_for(client_id) {
            return;
        }
        if self.storage.owned(client_id).is_some() {
            if let Some(c) = self.storage.commands(client_id, Change::Done(delivery)) {
                self.commands.extend(c);
            }
            return;
        }
        match &mut self.local {
            Some(l) => l.delivery_done(client_id, delivery),
            None => self
                .direct
                .merge(self.storage.local.delivery_done(client_id, delivery)),
        }
    }

    fn pending_release(&mut self, client_id: &ClientId, packet_id: PacketId, pending: bool) {
        self.session(
            client_id,
            Change::PendingRelease(packet_id, pending),
            |b| match &mut b.local {
                Some(l) => l.pending_release(client_id, packet_id, pending),
                None => b.direct.merge(
                    b.storage
                        .local
                        .pending_release(client_id, packet_id, pending),
                ),
            },
        );
    }

    fn publish(&mut self, message: &Message, from: Option<&ClientId>, counter: u64) {
        let Some(node) = self.storage.node.get() else {
            return;
        };
        self.commands.push(Command::Publish {
            id: MessageId {
                node: node.id,
                incarnation: node.incarnation,
                counter,
            },
            message: stored_message(message),
            from: from.map(|c| c.as_str().to_owned()),
            max_queued: self.storage.max_queued,
        });
    }

    fn ticket(&self) -> Ticket {
        Ticket::new(self.ticket)
    }

    fn commit(mut self: Box<Self>) -> Ticket {
        let mut local = self.direct;
        if let Some(l) = self.local.take() {
            local.merge(l.commit());
        }
        let commands = std::mem::take(&mut self.commands);
        let raft = self.storage.propose(commands);
        let empty = local.is_none() && raft.1 == 0 && self.held.is_empty();
        self.close(local, raft);
        if empty {
            Ticket::NONE
        } else {
            Ticket::new(self.ticket)
        }
    }
}

impl Drop for ClusterBatch<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Dropped without a commit: nothing of it is recorded, its ticket holds nothing up.
            self.held.clear();
            self.close(Ticket::NONE, (0, 0));
        }
    }
}
