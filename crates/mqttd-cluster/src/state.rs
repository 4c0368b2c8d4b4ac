//! The replicated cluster state and the commands that change it (sans-IO).
//!
//! Every node applies the same committed commands in the same order, so this module must be
//! deterministic: no clock (a command carries the time it was proposed at), no randomness, no
//! I/O. The Raft glue in [`crate::store`] feeds it committed entries; tests drive it by hand.
//!
//! Fencing: a session has one owner node and an epoch. A claim (a CONNECT that takes the session
//! over) makes the claimant the owner and bumps the epoch; every later command for the session
//! carries the epoch its sender holds, and one with another epoch is rejected, so that a node
//! that lost a session (it was partitioned away, or paused) can never change it again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::routes::{Route, TrieNode};
use crate::session::{
    Delivered, EnqueueResult, MessageId, SessionData, Step, StoredMessage, StoredWill,
    SubscriptionOptions,
};

/// A Raft node id.
pub type NodeId = u64;

/// What the cluster knows of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's name (its certificate's name).
    pub name: String,
    /// Bumped by the node at every start: what a peer tagged with an older incarnation sent
    /// belongs to a previous life of the node.
    pub incarnation: u64,
}

/// Who owns a persistent session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionOwner {
    /// The node serving (or last serving) the session.
    pub owner: NodeId,
    /// Bumped by every claim; commands carrying another epoch are rejected.
    pub epoch: u64,
    /// When the session expires, in milliseconds since the Unix epoch; `None`: never.
    pub expires_at_ms: Option<u64>,
    /// The highest epoch whose owner has let the session go (its client disconnected, so
    /// nothing more goes out under that epoch): the new owner answers CONNACK once this
    /// reaches the previous epoch, or a lease's time has passed.
    #[serde(default)]
    pub released: u64,
    /// The owner's incarnation when it claimed the session: a later life of the node does
    /// not hold the session in memory.
    #[serde(default)]
    pub incarnation: u64,
    /// The session's expiry interval in seconds (`u32::MAX`: never), as its owner last said:
    /// the expiry that starts when its node is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_secs: Option<u32>,
    /// Its owner is gone (down, removed, or started again): nobody serves the session until
    /// a client claims it. Set once, by the first of these.
    #[serde(default)]
    pub orphaned: bool,
}

/// A will whose connection is gone with its node, published by the leader once due.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DueWill {
    /// When it is due (ms since the Unix epoch): its delay after the node was found gone,
    /// or the session's expiry if that comes first.
    pub due_ms: u64,
    /// The will.
    pub will: StoredWill,
}

/// A retained message (its topic is the key it is held under).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retained {
    /// The message's payload.
    pub payload: Vec<u8>,
    /// Its QoS (0, 1 or 2).
    pub qos: u8,
    /// Its MQTT 5 properties (and expiry).
    #[serde(default)]
    pub properties: crate::session::StoredProperties,
}

/// A change to the cluster state, proposed to the leader and applied once committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Command {
    /// A node started (or joined) with this incarnation.
    NodeUp {
        /// The node.
        node: NodeId,
        /// Its name.
        name: String,
        /// Its incarnation: must be above the one recorded.
        incarnation: u64,
        /// When it announced itself (ms since the Unix epoch): the sessions of its earlier
        /// lives are orphaned then (see [`Command::NodeDown`]).
        #[serde(default)]
        now_ms: u64,
    },
    /// A node left the cluster for good: its sessions are orphaned (see
    /// [`Command::NodeDown`]).
    NodeRemoved {
        /// The node.
        node: NodeId,
        /// When it was removed (ms since the Unix epoch): expiries and wills run from then.
        #[serde(default)]
        now_ms: u64,
    },
    /// The leader has not heard from `node` for longer than an election takes: its
    /// connections are taken as lost. Each session it owns under `incarnation` or earlier is
    /// orphaned: fenced off (a new epoch, so that the node, were it only cut off, changes
    /// nothing and lets its client go), its expiry started, its will due after its delay.
    NodeDown {
        /// The node.
        node: NodeId,
        /// The incarnation found gone: a later life is not touched.
        incarnation: u64,
        /// The leader's time (ms since the Unix epoch).
        now_ms: u64,
    },
    /// The wills due at `now_ms` are published by node `by` (the leader proposing it), and
    /// forgotten by the cluster: at most once each.
    PublishWills {
        /// The publishing node.
        by: NodeId,
        /// The leader's time (ms since the Unix epoch).
        now_ms: u64,
    },
    /// `node` takes the session of `client_id` over (or creates it): epoch + 1.
    ClaimSession {
        /// The client id.
        client_id: String,
        /// The claiming node.
        node: NodeId,
        /// When the session expires if nobody renews it (ms since the Unix epoch).
        expires_at_ms: Option<u64>,
        /// A clean start: the session's contents are discarded.
        #[serde(default)]
        clean: bool,
        /// The claimant's incarnation.
        #[serde(default)]
        incarnation: u64,
        /// How long, at least, nothing the session's owner proposed has been committed under
        /// its claim (ms; set by the leader that proposes the claim, `network::Stamp`):
        /// handed back in [`Outcome::Claimed`], it shortens the new owner's lease.
        #[serde(default)]
        owner_quiet_ms: u64,
        /// The claimant's deadline (ms since the Unix epoch; 0: none): a leader that would
        /// append the claim after it refuses it ([`Rejection::ClaimTooLate`]). The claimant
        /// has given its CONNECT up by then, and its client may have connected elsewhere
        /// since; a claim committed later would take the session from that connection.
        #[serde(default)]
        not_after_ms: u64,
    },
    /// The owner changes the session's expiry (its client disconnected or reconnected).
    SetSessionExpiry {
        /// The client id.
        client_id: String,
        /// The owner node sending it.
        node: NodeId,
        /// The epoch the owner holds.
        epoch: u64,
        /// The new expiry (ms since the Unix epoch).
        expires_at_ms: Option<u64>,
        /// The session's expiry interval in seconds (`u32::MAX`: never), if the sender says.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        interval_secs: Option<u32>,
    },
    /// The owner ends the session (a clean start, or a DISCONNECT with expiry 0).
    DropSession {
        /// The client id.
        client_id: String,
        /// The owner node sending it.
        node: NodeId,
        /// The epoch the owner holds.
        epoch: u64,
    },
    /// The node that owned the session under `epoch` has let it go: its client is
    /// disconnected and nothing more goes out under that epoch. Not fenced (the sender lost
    /// the session); it only ever raises [`SessionOwner::released`].
    Released {
        /// The client id.
        client_id: String,
        /// The old owner.
        node: NodeId,
        /// The epoch it held.
        epoch: u64,
    },
    /// Removes every session expired at `now_ms` (proposed by the leader; the time is in the
    /// command so that every node removes the same sessions).
    ExpireSessions {
        /// The time the leader proposed it at (ms since the Unix epoch).
        now_ms: u64,
    },
    /// A message for persistent sessions (from the node its publisher is connected to, which
    /// acknowledges the publication once this is committed). No epoch: a publisher does not
    /// own the sessions it publishes to.
    Enqueue {
        /// The message's identity: a session holds it once however often this is proposed.
        id: MessageId,
        /// The message.
        message: StoredMessage,
        /// The sessions it is for, each with the QoS to deliver it at.
        targets: Vec<(String, u8)>,
        /// The most messages a session's queue holds (the proposer's setting, in the command so
        /// that every node decides alike).
        max_queued: u32,
    },
    /// A QoS 1 or 2 message published on a node, for every persistent session with a
    /// matching subscription, wherever it is owned. The sessions are found when the command
    /// is applied, in the index of persistent subscriptions, so that a subscription
    /// committed before the publication gets it whichever node either came through. The
    /// node acknowledges the publication once this is committed.
    Publish {
        /// The message's identity: a session holds it once however often this is proposed.
        id: MessageId,
        /// The message.
        message: StoredMessage,
        /// The publishing client, for its No Local subscriptions.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
        /// The most messages a session's queue holds.
        max_queued: u32,
    },
    /// The owner's changes to its session, applied in order (see [`Step`]).
    SessionProgress {
        /// The client id.
        client_id: String,
        /// The owner node sending it.
        node: NodeId,
        /// The epoch the owner holds.
        epoch: u64,
        /// The changes.
        steps: Vec<Step>,
    },
    /// Sets the retained message of a topic.
    SetRetained {
        /// The topic name.
        topic: String,
        /// The message.
        message: Retained,
    },
    /// Deletes the retained message of a topic.
    DeleteRetained {
        /// The topic name.
        topic: String,
    },
    /// Several commands in one Raft entry, applied in order (group commit: what a node
    /// recorded while its previous proposal was under way). Each has its own outcome.
    Batch(Vec<Self>),
    /// A node's proposer's batch, numbered: applied once, however often it is proposed. A
    /// proposal whose answer was lost (a leader killed or paused while it was on its way) is
    /// proposed again, and may then be in the log twice; the repeat answers the first's
    /// outcomes, and a batch older than the node's latest changes nothing.
    Sequenced {
        /// The proposing node.
        node: NodeId,
        /// Its incarnation: numbering starts again with each.
        incarnation: u64,
        /// The batch's number, from 1, one after another.
        seq: u64,
        /// The commands, applied as [`Command::Batch`]'s.
        commands: Vec<Self>,
    },
}

/// Why a command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The command carries an epoch other than the session's: its sender lost the session.
    #[error("stale epoch {given} for the session (now epoch {current}, owned by node {owner})")]
    StaleEpoch {
        /// The epoch in the command.
        given: u64,
        /// The session's epoch.
        current: u64,
        /// The session's owner.
        owner: NodeId,
    },
    /// The epoch matches but the sender is not the owner (a bug in the sender).
    #[error("node {node} is not the owner of the session (node {owner} is)")]
    NotOwner {
        /// The sender.
        node: NodeId,
        /// The owner.
        owner: NodeId,
    },
    /// There is no such session.
    #[error("no such session")]
    NoSession,
    /// A node's numbered batch came after a later one of the same node (its proposer had
    /// given it up): it changes nothing.
    #[error("batch {seq} of node {node} came after batch {latest}")]
    StaleBatch {
        /// The node.
        node: NodeId,
        /// The batch's number.
        seq: u64,
        /// The latest applied of the node.
        latest: u64,
    },
    /// A node announced an incarnation not above the one recorded.
    #[error("stale incarnation {given} (recorded {current})")]
    StaleIncarnation {
        /// The incarnation in the command.
        given: u64,
        /// The one recorded.
        current: u64,
    },
    /// A claim reached the leader after its deadline (`not_after_ms`): not appended.
    #[error("the claim came {late_ms} ms after its deadline")]
    ClaimTooLate {
        /// How late, by the leader's clock.
        late_ms: u64,
    },
}

/// The result of applying one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[non_exhaustive]
pub enum Outcome {
    /// Applied (also the result of Raft's own entries: blank and membership).
    #[default]
    Done,
    /// The session was claimed: the claimant now holds `epoch`.
    Claimed {
        /// The new epoch.
        epoch: u64,
        /// The owner before the claim, and its epoch, if there was one.
        previous: Option<(NodeId, u64)>,
        /// Whether the session's contents were kept (CONNACK's session present): it existed
        /// and the claim was not a clean start.
        present: bool,
        /// The will of the connection the claim ends, taken out of the session: the claimant
        /// publishes it if it is due (no delay, or the session did not carry on).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        will: Option<StoredWill>,
        /// The claim's `owner_quiet_ms`: how much of the previous owner's lease has run.
        #[serde(default)]
        owner_quiet_ms: u64,
    },
    /// What [`Command::Publish`] did: how many sessions it was queued for, and how many
    /// refused it with a full queue.
    Published {
        /// Sessions that queued it (or held it already).
        queued: usize,
        /// Sessions whose queue was full.
        full: usize,
    },
    /// What [`Command::Enqueue`] did for each target, in order.
    Enqueued {
        /// One result per target.
        results: Vec<EnqueueResult>,
    },
    /// The owner's steps were applied; `ignored` of them found nothing to do (idempotent
    /// repeats).
    Progressed {
        /// How many steps changed nothing.
        ignored: usize,
    },
    /// `count` sessions expired.
    Expired {
        /// How many.
        count: usize,
    },
    /// `count` sessions of a node found gone were orphaned.
    Orphaned {
        /// How many.
        count: usize,
    },
    /// `count` due wills were handed to the publishing node.
    Wills {
        /// How many.
        count: usize,
    },
    /// Nothing changed.
    Rejected(Rejection),
    /// The outcomes of a [`Command::Batch`], in order.
    Batch(Vec<Self>),
}

/// What a node acts on once a command is applied: the owner of a session hands what was
/// queued for it to its client, and a node that lost a session disconnects its client.
/// Every node sees every effect; each acts on those of the sessions it owns or owned.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Effect {
    /// A message was queued for a session.
    Queued {
        /// The session.
        client_id: String,
        /// Its owner.
        owner: NodeId,
        /// The owner's epoch.
        epoch: u64,
        /// The message's place in the session's queue.
        seq: u64,
        /// Its identity.
        id: MessageId,
        /// The QoS it is to be delivered at.
        qos: u8,
        /// The RETAIN flag and subscription identifiers to deliver it with.
        delivered: Delivered,
        /// The message.
        message: Box<StoredMessage>,
    },
    /// A session was claimed (taken over, or created).
    Claimed {
        /// The session.
        client_id: String,
        /// The new owner.
        owner: NodeId,
        /// Its epoch.
        epoch: u64,
        /// The owner before, and its epoch.
        previous: Option<(NodeId, u64)>,
    },
    /// A session ended (dropped by its owner, or expired).
    Ended {
        /// The session.
        client_id: String,
        /// Its last owner.
        owner: NodeId,
    },
    /// The session's owner was found gone ([`Command::NodeDown`]): the owner, if it is
    /// only cut off, lets the session go as if another node had claimed it.
    Orphaned {
        /// The session.
        client_id: String,
        /// The owner found gone.
        owner: NodeId,
        /// The epoch it held.
        epoch: u64,
    },
    /// A will is due: node `by` publishes it.
    Will {
        /// The publishing node.
        by: NodeId,
        /// The session it belonged to.
        client_id: String,
        /// The will.
        will: StoredWill,
    },
    /// A topic's retained message was set (`Some`) or deleted: every node serves it.
    Retained {
        /// The topic.
        topic: String,
        /// The message, or `None` once deleted.
        message: Option<Retained>,
    },
}

/// The persistent sessions' subscriptions as a trie of filters, derived from the sessions'
/// contents (never serialized; rebuilt from a snapshot), so that the node a message is
/// published on finds every persistent session it is for, wherever that is owned.
/// Shared subscriptions are not in it: their messages go to one member, through the routes.
#[derive(Debug, Clone, Default)]
struct SubscriptionIndex {
    trie: TrieNode<(Box<str>, Box<str>)>,
}

impl SubscriptionIndex {
    fn insert(&mut self, client_id: &str, filter: &str) {
        let route = Route::parse(filter);
        if route.group.is_none() {
            self.trie.insert(&route, (client_id.into(), filter.into()));
        }
    }

    fn remove(&mut self, client_id: &str, filter: &str) {
        let route = Route::parse(filter);
        if route.group.is_none() {
            self.trie.remove(&route, &(client_id.into(), filter.into()));
        }
    }

    fn remove_all(&mut self, client_id: &str, data: &SessionData) {
        for filter in data.subscriptions.keys() {
            self.remove(client_id, filter);
        }
    }
}

/// Derived data compares equal: two states are the same when what they are derived from is.
impl PartialEq for SubscriptionIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for SubscriptionIndex {}

/// One persistent session's subscription that a topic matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistentMatch<'a> {
    /// The session.
    pub client_id: &'a str,
    /// The node that owns it.
    pub owner: NodeId,
    /// The matching filter.
    pub filter: &'a str,
    /// The subscription's options.
    pub options: SubscriptionOptions,
}

/// The replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    nodes: BTreeMap<NodeId, NodeRecord>,
    sessions: BTreeMap<String, SessionOwner>,
    /// The contents of each session in `sessions` (same keys).
    #[serde(default)]
    contents: BTreeMap<String, SessionData>,
    retained: BTreeMap<String, Retained>,
    /// The latest epoch handed out by a claim.
    last_epoch: u64,
    /// Each node's latest numbered batch ([`Command::Sequenced`]).
    #[serde(default)]
    batches: BTreeMap<NodeId, LastBatch>,
    /// Wills of connections gone with their node, until published.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    due_wills: BTreeMap<String, DueWill>,
    #[serde(skip)]
    index: SubscriptionIndex,
}

/// A node's latest applied [`Command::Sequenced`]: its number and outcomes, which a repeat
/// of it answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct LastBatch {
    incarnation: u64,
    seq: u64,
    outcomes: Vec<Outcome>,
}

impl ClusterState {
    /// Applies one committed command.
    pub fn apply(&mut self, command: Command) -> Outcome {
        self.apply_with(command, &mut Vec::new())
    }

    /// Applies one committed command, adding what nodes must act on to `effects`.
    pub fn apply_with(&mut self, command: Command, effects: &mut Vec<Effect>) -> Outcome {
        match command {
            Command::NodeUp {
                node,
                name,
                incarnation,
                now_ms,
            } => {
                if let Some(known) = self.nodes.get(&node) {
                    if incarnation <= known.incarnation {
                        return Outcome::Rejected(Rejection::StaleIncarnation {
                            given: incarnation,
                            current: known.incarnation,
                        });
                    }
                }
                let restarted = self.nodes.contains_key(&node);
                self.nodes.insert(node, NodeRecord { name, incarnation });
                if restarted {
                    // Started again: its earlier lives' connections are gone.
                    self.orphan(node, incarnation.saturating_sub(1), now_ms, effects);
                }
                Outcome::Done
            }
            Command::NodeRemoved { node, now_ms } => {
                self.nodes.remove(&node);
                self.batches.remove(&node);
                self.orphan(node, u64::MAX, now_ms, effects);
                Outcome::Done
            }
            Command::NodeDown {
                node,
                incarnation,
                now_ms,
            } => Outcome::Orphaned {
                count: self.orphan(node, incarnation, now_ms, effects),
            },
            Command::PublishWills { by, now_ms } => {
                let (due, later): (BTreeMap<_, _>, BTreeMap<_, _>) =
                    std::mem::take(&mut self.due_wills)
                        .into_iter()
                        .partition(|(_, w)| w.due_ms <= now_ms);
                self.due_wills = later;
                let count = due.len();
                effects.extend(due.into_iter().map(|(client_id, w)| Effect::Will {
                    by,
                    client_id,
                    will: w.will,
                }));
                Outcome::Wills { count }
            }
            Command::ClaimSession {
                client_id,
                node,
                expires_at_ms,
                clean,
                incarnation,
                owner_quiet_ms,
                // The leader's to check, before the claim is appended.
                not_after_ms: _,
            } => {
                let previous = self.sessions.get(&client_id).map(|s| (s.owner, s.epoch));
                let present = previous.is_some() && !clean;
                // The will of the connection the claim ends goes to the claimant, which
                // publishes it or not (MQTT's rules: its delay, a clean start), and is never
                // handed to a later claim again.
                let due = self.due_wills.remove(&client_id).map(|w| w.will);
                let will = self
                    .contents
                    .get_mut(&client_id)
                    .and_then(|d| d.will.take())
                    .or(due);
                if !present {
                    if let Some(old) = self
                        .contents
                        .insert(client_id.clone(), SessionData::default())
                    {
                        self.index.remove_all(&client_id, &old);
                    }
                }
                // One counter for all sessions: an epoch is never reused, not even by a session
                // dropped and created again, so a command from its earlier life stays stale.
                self.last_epoch = self.last_epoch.saturating_add(1);
                let epoch = self.last_epoch;
                let (released, expiry_secs) = self
                    .sessions
                    .get(&client_id)
                    .map_or((0, None), |s| (s.released, s.expiry_secs));
                self.sessions.insert(
                    client_id.clone(),
                    SessionOwner {
                        owner: node,
                        epoch,
                        expires_at_ms,
                        released,
                        incarnation,
                        expiry_secs,
                        orphaned: false,
                    },
                );
                effects.push(Effect::Claimed {
                    client_id,
                    owner: node,
                    epoch,
                    previous,
                });
                Outcome::Claimed {
                    epoch,
                    previous,
                    present,
                    will,
                    owner_quiet_ms,
                }
            }
            Command::SetSessionExpiry {
                client_id,
                node,
                epoch,
                expires_at_ms,
                interval_secs,
            } => match self.fenced(&client_id, node, epoch) {
                Ok(()) => {
                    if let Some(s) = self.sessions.get_mut(&client_id) {
                        s.expires_at_ms = expires_at_ms;
                        s.expiry_secs = interval_secs.or(s.expiry_secs);
                    }
                    Outcome::Done
                }
                Err(r) => Outcome::Rejected(r),
            },
            Command::DropSession {
                client_id,
                node,
                epoch,
            } => match self.fenced(&client_id, node, epoch) {
                Ok(()) => {
                    self.end(client_id, effects);
                    Outcome::Done
                }
                Err(r) => Outcome::Rejected(r),
            },
            Command::Released {
                client_id, epoch, ..
            } => {
                if let Some(s) = self.sessions.get_mut(&client_id) {
                    s.released = s.released.max(epoch.min(s.epoch));
                }
                Outcome::Done
            }
            Command::ExpireSessions { now_ms } => {
                let expired: Vec<String> = self
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.expires_at_ms.is_some_and(|at| at <= now_ms))
                    .map(|(id, _)| id.clone())
                    .collect();
                let count = expired.len();
                for client_id in expired {
                    self.end(client_id, effects);
                }
                Outcome::Expired { count }
            }
            Command::Enqueue {
                id,
                message,
                targets,
                max_queued,
            } => {
                let results = targets
                    .into_iter()
                    .map(|(client_id, qos)| {
                        let (Some(data), Some(owner)) = (
                            self.contents.get_mut(&client_id),
                            self.sessions.get(&client_id),
                        ) else {
                            return EnqueueResult::NoSession;
                        };
                        let result = data.enqueue(id, message.clone(), qos, max_queued);
                        if let EnqueueResult::Queued(seq) = result {
                            effects.push(Effect::Queued {
                                owner: owner.owner,
                                epoch: owner.epoch,
                                client_id,
                                seq,
                                id,
                                qos,
                                delivered: Delivered::default(),
                                message: Box::new(message.clone()),
                            });
                        }
                        result
                    })
                    .collect();
                Outcome::Enqueued { results }
            }
            Command::Publish {
                id,
                message,
                from,
                max_queued,
            } => self.publish(id, &message, from.as_deref(), max_queued, effects),
            Command::SessionProgress {
                client_id,
                node,
                epoch,
                steps,
            } => match self.fenced(&client_id, node, epoch) {
                Ok(()) => {
                    let data = self.contents.entry(client_id.clone()).or_default();
                    let mut ignored = 0;
                    for step in steps {
                        let index = match &step {
                            Step::Subscribe { filter, .. } => Some((filter.clone(), true)),
                            Step::Unsubscribe { filter } => Some((filter.clone(), false)),
                            _ => None,
                        };
                        let replaced = matches!(step, Step::Subscriptions(_));
                        if replaced {
                            self.index.remove_all(&client_id, data);
                        }
                        let changed = data.step(step);
                        if replaced {
                            for filter in data.subscriptions.keys() {
                                self.index.insert(&client_id, filter);
                            }
                        }
                        match index {
                            _ if !changed => ignored += 1,
                            Some((filter, true)) => self.index.insert(&client_id, &filter),
                            Some((filter, false)) => self.index.remove(&client_id, &filter),
                            None => {}
                        }
                    }
                    Outcome::Progressed { ignored }
                }
                Err(r) => Outcome::Rejected(r),
            },
            Command::SetRetained { topic, message } => {
                self.retained.insert(topic.clone(), message.clone());
                effects.push(Effect::Retained {
                    topic,
                    message: Some(message),
                });
                Outcome::Done
            }
            Command::DeleteRetained { topic } => {
                self.retained.remove(&topic);
                effects.push(Effect::Retained {
                    topic,
                    message: None,
                });
                Outcome::Done
            }
            Command::Batch(commands) => Outcome::Batch(
                commands
                    .into_iter()
                    .map(|c| self.apply_with(c, effects))
                    .collect(),
            ),
            Command::Sequenced {
                node,
                incarnation,
                seq,
                commands,
            } => {
                if let Some(last) = self.batches.get(&node) {
                    let order = (incarnation, seq).cmp(&(last.incarnation, last.seq));
                    if order == std::cmp::Ordering::Equal {
                        return Outcome::Batch(last.outcomes.clone());
                    }
                    if order == std::cmp::Ordering::Less {
                        return Outcome::Rejected(Rejection::StaleBatch {
                            node,
                            seq,
                            latest: last.seq,
                        });
                    }
                }
                let outcomes: Vec<Outcome> = commands
                    .into_iter()
                    .map(|c| self.apply_with(c, effects))
                    .collect();
                self.batches.insert(
                    node,
                    LastBatch {
                        incarnation,
                        seq,
                        outcomes: outcomes.clone(),
                    },
                );
                Outcome::Batch(outcomes)
            }
        }
    }

    /// Queues `message` for every persistent session it matches: one copy per session, at
    /// the highest QoS of its matching subscriptions (capped by the message's), with their
    /// identifiers, skipping the publisher's No Local subscriptions and copies that would go
    /// at QoS 0 (those travel as clean sessions' messages do).
    fn publish(
        &mut self,
        id: MessageId,
        message: &StoredMessage,
        from: Option<&str>,
        max_queued: u32,
        effects: &mut Vec<Effect>,
    ) -> Outcome {
        let mut per_session: BTreeMap<String, (u8, Delivered)> = BTreeMap::new();
        for m in self.persistent_matches(&message.topic) {
            if m.options.no_local && Some(m.client_id) == from {
                continue;
            }
            let (qos, delivered) = per_session.entry(m.client_id.to_owned()).or_default();
            *qos = (*qos).max(m.options.qos.min(message.qos));
            delivered.retain |= m.options.retain_as_published && message.retain;
            delivered.subscription_ids.extend(m.options.identifier);
        }
        let (mut queued, mut full) = (0, 0);
        for (client_id, (qos, mut delivered)) in per_session {
            if qos == 0 {
                continue;
            }
            let (Some(data), Some(owner)) = (
                self.contents.get_mut(&client_id),
                self.sessions.get(&client_id),
            ) else {
                continue;
            };
            delivered.subscription_ids.sort_unstable();
            match data.enqueue_as(id, message.clone(), qos, delivered.clone(), max_queued) {
                EnqueueResult::Queued(seq) => {
                    queued += 1;
                    effects.push(Effect::Queued {
                        owner: owner.owner,
                        epoch: owner.epoch,
                        client_id,
                        seq,
                        id,
                        qos,
                        delivered,
                        message: Box::new(message.clone()),
                    });
                }
                EnqueueResult::Held(_) => queued += 1,
                EnqueueResult::Full => full += 1,
                EnqueueResult::NoSession => {}
            }
        }
        Outcome::Published { queued, full }
    }

    /// Orphans the sessions `node` owns under `incarnation` or earlier (see
    /// [`Command::NodeDown`]); returns how many.
    fn orphan(
        &mut self,
        node: NodeId,
        incarnation: u64,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) -> usize {
        let mut count = 0;
        for (client_id, s) in &mut self.sessions {
            if s.owner != node || s.orphaned || s.incarnation > incarnation {
                continue;
            }
            count += 1;
            let held = s.epoch;
            self.last_epoch = self.last_epoch.saturating_add(1);
            s.epoch = self.last_epoch;
            // Nobody holds the new epoch: a claimant need not wait for it to be let go.
            s.released = s.epoch;
            s.orphaned = true;
            if s.expires_at_ms.is_none() {
                // Its connection is lost now, as a disconnection would start it.
                s.expires_at_ms = s
                    .expiry_secs
                    .filter(|secs| *secs != u32::MAX)
                    .map(|secs| now_ms.saturating_add(u64::from(secs) * 1000));
            }
            if let Some(will) = self.contents.get_mut(client_id).and_then(|d| d.will.take()) {
                let delayed = now_ms.saturating_add(u64::from(will.delay_secs) * 1000);
                self.due_wills.insert(
                    client_id.clone(),
                    DueWill {
                        // Published when its delay has passed or its session ends,
                        // whichever comes first.
                        due_ms: s.expires_at_ms.map_or(delayed, |at| at.min(delayed)),
                        will,
                    },
                );
            }
            effects.push(Effect::Orphaned {
                client_id: client_id.clone(),
                owner: node,
                epoch: held,
            });
        }
        count
    }

    /// Ends a session: forgets its owner, its contents and its subscriptions.
    fn end(&mut self, client_id: String, effects: &mut Vec<Effect>) {
        if let Some(data) = self.contents.remove(&client_id) {
            self.index.remove_all(&client_id, &data);
        }
        if let Some(owner) = self.sessions.remove(&client_id) {
            effects.push(Effect::Ended {
                client_id,
                owner: owner.owner,
            });
        }
    }

    /// Every persistent session's subscription that `topic` matches (shared subscriptions
    /// aside), with the session's owner.
    pub fn persistent_matches(&self, topic: &str) -> Vec<PersistentMatch<'_>> {
        let mut found = Vec::new();
        self.index.trie.each_match(topic, |group, holders| {
            if group.is_some() {
                return;
            }
            for (client_id, filter) in holders {
                let (Some(owner), Some(options)) = (
                    self.sessions.get(&**client_id),
                    self.contents
                        .get(&**client_id)
                        .and_then(|d| d.subscriptions.get(&**filter)),
                ) else {
                    continue;
                };
                found.push(PersistentMatch {
                    client_id,
                    owner: owner.owner,
                    filter,
                    options: *options,
                });
            }
        });
        found
    }

    /// Checks that `node` holding `epoch` may change the session.
    fn fenced(&self, client_id: &str, node: NodeId, epoch: u64) -> Result<(), Rejection> {
        let s = self.sessions.get(client_id).ok_or(Rejection::NoSession)?;
        if s.epoch != epoch {
            return Err(Rejection::StaleEpoch {
                given: epoch,
                current: s.epoch,
                owner: s.owner,
            });
        }
        if s.owner != node {
            return Err(Rejection::NotOwner {
                node,
                owner: s.owner,
            });
        }
        Ok(())
    }

    /// The nodes the cluster knows, with their incarnations.
    pub fn nodes(&self) -> &BTreeMap<NodeId, NodeRecord> {
        &self.nodes
    }

    /// The owner record of a session.
    pub fn session(&self, client_id: &str) -> Option<&SessionOwner> {
        self.sessions.get(client_id)
    }

    /// The contents of a session (subscriptions, queue, in flight, will).
    pub fn session_data(&self, client_id: &str) -> Option<&SessionData> {
        self.contents.get(client_id)
    }

    /// The earliest session expiry (ms since the Unix epoch), if a session has one: the
    /// leader proposes `ExpireSessions` only once it has passed.
    pub fn earliest_expiry(&self) -> Option<u64> {
        self.sessions.values().filter_map(|s| s.expires_at_ms).min()
    }

    /// When the earliest will of a gone connection is due (ms since the Unix epoch): the
    /// leader proposes `PublishWills` once it has passed.
    pub fn earliest_will(&self) -> Option<u64> {
        self.due_wills.values().map(|w| w.due_ms).min()
    }

    /// Whether `node` serves a session it claimed under `incarnation` or earlier that is not
    /// orphaned yet: what a [`Command::NodeDown`] would change.
    pub fn serves_sessions(&self, node: NodeId, incarnation: u64) -> bool {
        self.sessions
            .values()
            .any(|s| s.owner == node && !s.orphaned && s.incarnation <= incarnation)
    }

    /// The wills of gone connections waiting for their time, by client id (one per session:
    /// a session is orphaned once until claimed again, and a claim takes its will).
    pub fn due_wills(&self) -> impl ExactSizeIterator<Item = (&str, &DueWill)> {
        self.due_wills.iter().map(|(c, w)| (c.as_str(), w))
    }

    /// The number of sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The retained message of a topic.
    pub fn retained(&self, topic: &str) -> Option<&Retained> {
        self.retained.get(topic)
    }

    /// The number of retained messages.
    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// Every retained message, by topic.
    pub fn retained_messages(&self) -> impl Iterator<Item = (&str, &Retained)> {
        self.retained.iter().map(|(t, m)| (t.as_str(), m))
    }

    /// The state as bytes (a snapshot).
    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// The state from a snapshot's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let mut state: Self = serde_json::from_slice(bytes)?;
        let mut index = SubscriptionIndex::default();
        for (client_id, data) in &state.contents {
            for filter in data.subscriptions.keys() {
                index.insert(client_id, filter);
            }
        }
        state.index = index;
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(s: &mut ClusterState, id: &str, node: NodeId) -> u64 {
        match s.apply(Command::ClaimSession {
            owner_quiet_ms: 0,
            not_after_ms: 0,
            incarnation: 0,
            client_id: id.into(),
            node,
            expires_at_ms: None,
            clean: false,
        }) {
            Outcome::Claimed { epoch, .. } => epoch,
            other => panic!("claim: {other:?}"),
        }
    }

    #[test]
    fn a_claim_bumps_the_epoch_and_fences_the_old_owner() {
        let mut s = ClusterState::default();
        assert_eq!(claim(&mut s, "c", 1), 1);
        assert_eq!(claim(&mut s, "other", 1), 2);
        let out = s.apply(Command::ClaimSession {
            owner_quiet_ms: 0,
            not_after_ms: 0,
            incarnation: 0,
            client_id: "c".into(),
            node: 2,
            expires_at_ms: Some(10),
            clean: false,
        });
        assert_eq!(
            out,
            Outcome::Claimed {
                epoch: 3,
                previous: Some((1, 1)),
                present: true,
                will: None,
                owner_quiet_ms: 0,
            }
        );
        // The old owner, still believing in epoch 1, can change nothing.
        let stale = s.apply(Command::DropSession {
            client_id: "c".into(),
            node: 1,
            epoch: 1,
        });
        assert_eq!(
            stale,
            Outcome::Rejected(Rejection::StaleEpoch {
                given: 1,
                current: 3,
                owner: 2
            })
        );
        // The right epoch from the wrong node is refused too.
        let wrong = s.apply(Command::SetSessionExpiry {
            interval_secs: None,
            client_id: "c".into(),
            node: 1,
            epoch: 3,
            expires_at_ms: None,
        });
        assert_eq!(
            wrong,
            Outcome::Rejected(Rejection::NotOwner { node: 1, owner: 2 })
        );
        assert_eq!(s.session("c").map(|o| o.expires_at_ms), Some(Some(10)));
        // The owner can.
        let ok = s.apply(Command::SetSessionExpiry {
            interval_secs: None,
            client_id: "c".into(),
            node: 2,
            epoch: 3,
            expires_at_ms: Some(20),
        });
        assert_eq!(ok, Outcome::Done);
        assert_eq!(
            s.apply(Command::DropSession {
                client_id: "c".into(),
                node: 2,
                epoch: 3
            }),
            Outcome::Done
        );
        assert_eq!(s.session("c"), None);
        // Created again, the session gets a fresh epoch: the old one stays stale.
        assert_eq!(claim(&mut s, "c", 2), 4);
        assert_eq!(
            s.apply(Command::DropSession {
                client_id: "gone".into(),
                node: 2,
                epoch: 3
            }),
            Outcome::Rejected(Rejection::NoSession)
        );
    }

    fn message(topic: &str) -> StoredMessage {
        StoredMessage {
            topic: topic.into(),
            payload: b"m".to_vec(),
            qos: 1,
            retain: false,
            properties: Default::default(),
        }
    }

    #[test]
    fn a_session_s_contents_survive_a_takeover_and_the_old_owner_is_fenced_off() {
        let mut s = ClusterState::default();
        let first = claim(&mut s, "c", 1);
        let progress = |node, epoch, steps| Command::SessionProgress {
            client_id: "c".into(),
            node,
            epoch,
            steps,
        };
        let sub = Step::Subscribe {
            filter: "t/#".into(),
            options: SubscriptionOptions {
                qos: 1,
                no_local: false,
                retain_as_published: false,
                identifier: None,
            },
        };
        assert_eq!(
            s.apply(progress(1, first, vec![sub])),
            Outcome::Progressed { ignored: 0 }
        );
        let enqueue = |topic: &str| Command::Enqueue {
            id: MessageId {
                node: 3,
                incarnation: 1,
                counter: topic.bytes().map(u64::from).sum::<u64>(),
            },
            message: message(topic),
            targets: vec![("c".into(), 1), ("nobody".into(), 1)],
            max_queued: 10,
        };
        assert_eq!(
            s.apply(enqueue("t/1")),
            Outcome::Enqueued {
                results: vec![EnqueueResult::Queued(0), EnqueueResult::NoSession]
            }
        );
        s.apply(enqueue("t/2"));
        let sent = Step::Sent {
            seq: 0,
            packet_id: Some(1),
        };
        assert_eq!(
            s.apply(progress(1, first, vec![sent.clone(), sent])),
            Outcome::Progressed { ignored: 1 },
            "the repeat finds nothing to do"
        );

        // Node 2 takes the session over: everything is there.
        let Outcome::Claimed {
            epoch: second,
            present: true,
            ..
        } = s.apply(Command::ClaimSession {
            owner_quiet_ms: 0,
            not_after_ms: 0,
            incarnation: 0,
            client_id: "c".into(),
            node: 2,
            expires_at_ms: None,
            clean: false,
        })
        else {
            panic!("a takeover keeps the session");
        };
        let data = s.session_data("c").unwrap();
        assert_eq!(data.subscriptions.len(), 1);
        assert_eq!(data.in_flight.get(&1).map(|f| f.seq), Some(0));
        assert_eq!(data.queue.front().map(|q| q.seq), Some(1));
        // The old owner's acknowledgement comes too late: rejected, nothing changes.
        let before = s.clone();
        assert!(matches!(
            s.apply(progress(1, first, vec![Step::Acked { packet_id: 1 }])),
            Outcome::Rejected(Rejection::StaleEpoch { .. })
        ));
        assert_eq!(s, before);
        assert_eq!(
            s.apply(progress(2, second, vec![Step::Acked { packet_id: 1 }])),
            Outcome::Progressed { ignored: 0 }
        );

        // A clean start discards the contents; expiry and drop remove them.
        assert!(matches!(
            s.apply(Command::ClaimSession {
                owner_quiet_ms: 0,
                not_after_ms: 0,
                incarnation: 0,
                client_id: "c".into(),
                node: 3,
                expires_at_ms: Some(5),
                clean: true,
            }),
            Outcome::Claimed { present: false, .. }
        ));
        assert_eq!(s.session_data("c"), Some(&SessionData::default()));
        s.apply(Command::ExpireSessions { now_ms: 10 });
        assert_eq!(s.session_data("c"), None);
        assert_eq!(
            s.apply(enqueue("t/3")),
            Outcome::Enqueued {
                results: vec![EnqueueResult::NoSession, EnqueueResult::NoSession]
            }
        );
    }

    #[test]
    fn a_claim_hands_the_ended_connection_s_will_to_the_claimant_once() {
        let mut s = ClusterState::default();
        let first = claim(&mut s, "c", 1);
        let will = StoredWill {
            message: message("will/c"),
            delay_secs: 0,
        };
        s.apply(Command::SessionProgress {
            client_id: "c".into(),
            node: 1,
            epoch: first,
            steps: vec![Step::Will(Some(will.clone()))],
        });
        let claim_by = |s: &mut ClusterState, node, clean| {
            s.apply(Command::ClaimSession {
                owner_quiet_ms: 0,
                not_after_ms: 0,
                incarnation: 0,
                client_id: "c".into(),
                node,
                expires_at_ms: None,
                clean,
            })
        };
        let Outcome::Claimed {
            will: taken,
            present: true,
            ..
        } = claim_by(&mut s, 2, false)
        else {
            panic!("a takeover keeps the session");
        };
        assert_eq!(taken, Some(will.clone()));
        assert_eq!(s.session_data("c").and_then(|d| d.will.clone()), None);
        // Claimed again before the new connection set a will: nothing to publish twice.
        assert!(matches!(
            claim_by(&mut s, 3, false),
            Outcome::Claimed { will: None, .. }
        ));
        // A clean start ends the session: its will comes out with it.
        let third = s.session("c").unwrap().epoch;
        s.apply(Command::SessionProgress {
            client_id: "c".into(),
            node: 3,
            epoch: third,
            steps: vec![Step::Will(Some(will.clone()))],
        });
        assert!(matches!(
            claim_by(&mut s, 1, true),
            Outcome::Claimed { will: Some(w), present: false, .. } if w == will
        ));
    }

    #[test]
    fn a_gone_node_s_sessions_are_orphaned_with_their_expiry_started_and_their_wills_due() {
        let mut s = ClusterState::default();
        let up = |node: NodeId, incarnation| Command::NodeUp {
            node,
            name: format!("n{node}"),
            incarnation,
            now_ms: 1_000,
        };
        s.apply(up(1, 1));
        s.apply(up(2, 1));
        let will = |delay_secs| StoredWill {
            message: message("will"),
            delay_secs,
        };
        // Sessions of node 1 (incarnation 1): connected, with an expiry interval and a will;
        // one without a will that never expires; one already disconnected.
        let mut setup = |id: &str, interval: u32, at: Option<u64>, w: Option<StoredWill>| {
            let Outcome::Claimed { epoch, .. } = s.apply(Command::ClaimSession {
                owner_quiet_ms: 0,
                not_after_ms: 0,
                client_id: id.into(),
                node: 1,
                expires_at_ms: None,
                clean: false,
                incarnation: 1,
            }) else {
                panic!("claimed");
            };
            s.apply(Command::SetSessionExpiry {
                client_id: id.into(),
                node: 1,
                epoch,
                expires_at_ms: at,
                interval_secs: Some(interval),
            });
            s.apply(Command::SessionProgress {
                client_id: id.into(),
                node: 1,
                epoch,
                steps: vec![Step::Will(w)],
            });
            epoch
        };
        let a = setup("a", 60, None, Some(will(5)));
        setup("b", u32::MAX, None, None);
        setup("c", 60, Some(9_000), Some(will(100)));
        let d = claim(&mut s, "d", 2);

        let mut effects = Vec::new();
        let down = Command::NodeDown {
            node: 1,
            incarnation: 1,
            now_ms: 2_000,
        };
        assert_eq!(
            s.apply_with(down.clone(), &mut effects),
            Outcome::Orphaned { count: 3 }
        );
        assert!(effects.contains(&Effect::Orphaned {
            client_id: "a".into(),
            owner: 1,
            epoch: a,
        }));
        // Fenced: node 1's commands under its epoch are refused.
        assert!(matches!(
            s.apply(Command::DropSession {
                client_id: "a".into(),
                node: 1,
                epoch: a
            }),
            Outcome::Rejected(Rejection::StaleEpoch { .. })
        ));
        let owner = |s: &ClusterState, id: &str| s.session(id).cloned().unwrap();
        assert_eq!(owner(&s, "a").expires_at_ms, Some(62_000));
        assert_eq!(owner(&s, "a").released, owner(&s, "a").epoch);
        assert_eq!(owner(&s, "b").expires_at_ms, None, "never expires");
        assert_eq!(owner(&s, "c").expires_at_ms, Some(9_000), "already running");
        assert_eq!(owner(&s, "d").epoch, d, "another node's session");
        // Wills: a's after its delay; c's when its session ends, before its delay.
        let due: Vec<(&str, u64)> = s.due_wills().map(|(c, w)| (c, w.due_ms)).collect();
        assert_eq!(due, [("a", 7_000), ("c", 9_000)]);
        assert_eq!(s.earliest_will(), Some(7_000));
        // Once: a second NodeDown finds nothing left to orphan.
        assert_eq!(s.apply(down), Outcome::Orphaned { count: 0 });
        assert!(!s.serves_sessions(1, 1));

        // c's client comes back on node 2 before its will is due: no will (a delay, and the
        // session carries on).
        assert!(matches!(
            s.apply(Command::ClaimSession {
                owner_quiet_ms: 0,
                not_after_ms: 0,
                client_id: "c".into(),
                node: 2,
                expires_at_ms: None,
                clean: false,
                incarnation: 1,
            }),
            Outcome::Claimed { will: Some(w), previous: Some((1, _)), .. } if w.delay_secs == 100
        ));
        assert_eq!(s.due_wills().len(), 1);
        // a's is due at 7 s: published once, by the node named.
        let mut effects = Vec::new();
        assert_eq!(
            s.apply_with(
                Command::PublishWills {
                    by: 2,
                    now_ms: 6_999
                },
                &mut effects
            ),
            Outcome::Wills { count: 0 }
        );
        assert_eq!(
            s.apply_with(
                Command::PublishWills {
                    by: 2,
                    now_ms: 7_000
                },
                &mut effects
            ),
            Outcome::Wills { count: 1 }
        );
        assert_eq!(
            effects,
            [Effect::Will {
                by: 2,
                client_id: "a".into(),
                will: will(5)
            }]
        );
        assert_eq!(s.earliest_will(), None);

        // Node 2 starts again: its earlier life's sessions are orphaned when it says so, but
        // not one its new life claimed before.
        let e = s.apply(Command::ClaimSession {
            owner_quiet_ms: 0,
            not_after_ms: 0,
            client_id: "e".into(),
            node: 2,
            expires_at_ms: None,
            clean: false,
            incarnation: 2,
        });
        assert!(matches!(e, Outcome::Claimed { .. }));
        s.apply(up(2, 2));
        assert!(owner(&s, "d").orphaned);
        assert!(owner(&s, "c").orphaned);
        assert!(!owner(&s, "e").orphaned);
        // Removed for good: every session it has left.
        s.apply(Command::NodeRemoved {
            node: 2,
            now_ms: 3_000,
        });
        assert!(owner(&s, "e").orphaned);
        // Claiming an orphaned session works as ever; a snapshot keeps what is due.
        assert_eq!(ClusterState::from_bytes(&s.to_bytes().unwrap()).unwrap(), s);
    }

    #[test]
    fn sessions_expire_at_the_time_in_the_command() {
        let mut s = ClusterState::default();
        for (id, at) in [("a", Some(100)), ("b", Some(200)), ("c", None)] {
            s.apply(Command::ClaimSession {
                owner_quiet_ms: 0,
                not_after_ms: 0,
                incarnation: 0,
                client_id: id.into(),
                node: 1,
                expires_at_ms: at,
                clean: false,
            });
        }
        assert_eq!(
            s.apply(Command::ExpireSessions { now_ms: 99 }),
            Outcome::Expired { count: 0 }
        );
        assert_eq!(
            s.apply(Command::ExpireSessions { now_ms: 150 }),
            Outcome::Expired { count: 1 }
        );
        assert!(s.session("a").is_none());
        assert!(s.session("b").is_some() && s.session("c").is_some());
        s.apply(Command::ExpireSessions { now_ms: u64::MAX });
        assert_eq!(s.session_count(), 1, "a session without expiry stays");
    }

    #[test]
    fn incarnations_only_grow() {
        let mut s = ClusterState::default();
        let up = |inc| Command::NodeUp {
            now_ms: 0,
            node: 3,
            name: "n3".into(),
            incarnation: inc,
        };
        assert_eq!(s.apply(up(5)), Outcome::Done);
        assert_eq!(
            s.apply(up(5)),
            Outcome::Rejected(Rejection::StaleIncarnation {
                given: 5,
                current: 5
            })
        );
        assert_eq!(s.apply(up(6)), Outcome::Done);
        assert_eq!(s.nodes().get(&3).map(|n| n.incarnation), Some(6));
        s.apply(Command::NodeRemoved { node: 3, now_ms: 0 });
        assert!(s.nodes().is_empty());
    }

    fn subscribe(s: &mut ClusterState, id: &str, node: NodeId, epoch: u64, filter: &str) {
        let out = s.apply(Command::SessionProgress {
            client_id: id.into(),
            node,
            epoch,
            steps: vec![Step::Subscribe {
                filter: filter.into(),
                options: SubscriptionOptions {
                    qos: 1,
                    no_local: false,
                    retain_as_published: false,
                    identifier: None,
                },
            }],
        });
        assert_eq!(out, Outcome::Progressed { ignored: 0 });
    }

    fn who(s: &ClusterState, topic: &str) -> Vec<(String, NodeId)> {
        let mut v: Vec<_> = s
            .persistent_matches(topic)
            .iter()
            .map(|m| (m.client_id.to_owned(), m.owner))
            .collect();
        v.sort();
        v
    }

    /// The index of persistent subscriptions follows subscribes, takeovers, clean starts,
    /// drops and expiry, and an enqueue tells the owner what to deliver.
    #[test]
    fn persistent_subscriptions_are_indexed_and_enqueues_become_effects() {
        let mut s = ClusterState::default();
        let a = claim(&mut s, "a", 1);
        let b = claim(&mut s, "b", 2);
        subscribe(&mut s, "a", 1, a, "t/+");
        subscribe(&mut s, "b", 2, b, "t/x");
        subscribe(&mut s, "b", 2, b, "$share/g/t/x");
        assert_eq!(who(&s, "t/x"), [("a".into(), 1), ("b".into(), 2)]);
        assert_eq!(who(&s, "t/y"), [("a".into(), 1)]);
        // Taken over, the session keeps its subscriptions under its new owner.
        let mut effects = Vec::new();
        let _ = s.apply_with(
            Command::ClaimSession {
                owner_quiet_ms: 0,
                not_after_ms: 0,
                incarnation: 0,
                client_id: "a".into(),
                node: 3,
                expires_at_ms: Some(50),
                clean: false,
            },
            &mut effects,
        );
        assert!(matches!(
            &effects[..],
            [Effect::Claimed {
                owner: 3,
                previous: Some((1, _)),
                ..
            }]
        ));
        assert_eq!(who(&s, "t/y"), [("a".into(), 3)]);
        // An enqueue is an effect for each session it queued for.
        effects.clear();
        let _ = s.apply_with(
            Command::Enqueue {
                id: MessageId {
                    node: 2,
                    incarnation: 1,
                    counter: 1,
                },
                message: message("t/x"),
                targets: vec![("a".into(), 1), ("b".into(), 1), ("gone".into(), 1)],
                max_queued: 10,
            },
            &mut effects,
        );
        let owners: Vec<_> = effects
            .iter()
            .map(|e| match e {
                Effect::Queued {
                    client_id,
                    owner,
                    seq,
                    ..
                } => (client_id.as_str(), *owner, *seq),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(owners, [("a", 3, 0), ("b", 2, 0)]);
        // A clean start forgets the subscriptions; so do a drop and expiry.
        let _ = s.apply(Command::ClaimSession {
            owner_quiet_ms: 0,
            not_after_ms: 0,
            incarnation: 0,
            client_id: "b".into(),
            node: 2,
            expires_at_ms: None,
            clean: true,
        });
        assert_eq!(who(&s, "t/x"), [("a".into(), 3)]);
        effects.clear();
        let _ = s.apply_with(Command::ExpireSessions { now_ms: 60 }, &mut effects);
        assert!(matches!(&effects[..], [Effect::Ended { owner: 3, .. }]));
        assert_eq!(who(&s, "t/x"), []);
        assert!(s.index.trie.is_empty(), "nothing left behind");
        let c = claim(&mut s, "c", 1);
        subscribe(&mut s, "c", 1, c, "#");
        let _ = s.apply(Command::DropSession {
            client_id: "c".into(),
            node: 1,
            epoch: c,
        });
        assert!(s.index.trie.all().iter().all(|(id, _)| &**id != "c"));
    }

    /// A publication finds its persistent sessions when applied: one copy each at the
    /// highest QoS of the matching subscriptions, none for the publisher's No Local ones or
    /// at QoS 0, once however often it is proposed.
    #[test]
    fn a_publication_is_queued_for_every_matching_persistent_session() {
        let mut s = ClusterState::default();
        let options = |qos, no_local, retain_as_published, identifier| SubscriptionOptions {
            qos,
            no_local,
            retain_as_published,
            identifier,
        };
        for (id, filters) in [
            (
                "a",
                vec![
                    ("t/+", options(1, false, false, Some(5))),
                    ("t/x", options(2, false, true, None)),
                ],
            ),
            ("b", vec![("t/#", options(0, false, false, None))]),
            ("c", vec![("t/x", options(1, true, false, None))]),
        ] {
            let epoch = claim(&mut s, id, 1);
            let steps = filters
                .into_iter()
                .map(|(f, options)| Step::Subscribe {
                    filter: f.into(),
                    options,
                })
                .collect();
            let _ = s.apply(Command::SessionProgress {
                client_id: id.into(),
                node: 1,
                epoch,
                steps,
            });
        }
        let publish = Command::Publish {
            id: MessageId {
                node: 2,
                incarnation: 1,
                counter: 9,
            },
            message: StoredMessage {
                retain: true,
                qos: 2,
                ..message("t/x")
            },
            from: Some("c".into()),
            max_queued: 10,
        };
        let mut effects = Vec::new();
        let out = s.apply_with(publish.clone(), &mut effects);
        assert_eq!(out, Outcome::Published { queued: 1, full: 0 });
        let [Effect::Queued {
            client_id,
            qos,
            delivered,
            ..
        }] = &effects[..]
        else {
            panic!("{effects:?}");
        };
        assert_eq!((client_id.as_str(), *qos), ("a", 2));
        assert_eq!(
            *delivered,
            Delivered {
                retain: true,
                subscription_ids: vec![5]
            }
        );
        effects.clear();
        assert_eq!(
            s.apply_with(publish, &mut effects),
            Outcome::Published { queued: 1, full: 0 }
        );
        assert!(effects.is_empty(), "held already: {effects:?}");
        assert_eq!(s.session_data("a").map(|d| d.queue.len()), Some(1));
    }

    /// The old owner's release is recorded for the new owner to see, and never claims more
    /// than the session's epoch.
    /// A numbered batch proposed again after its answer was lost is applied once: a
    /// publication forgotten in between is not queued a second time, and a batch older than
    /// the node's latest changes nothing.
    #[test]
    fn a_numbered_batch_is_applied_once() {
        let mut s = ClusterState::default();
        let epoch = claim(&mut s, "a", 1);
        subscribe(&mut s, "a", 1, epoch, "t/#");
        let id = MessageId {
            node: 2,
            incarnation: 1,
            counter: 1,
        };
        let batch = |seq, commands| Command::Sequenced {
            node: 2,
            incarnation: 1,
            seq,
            commands,
        };
        let publish = Command::Publish {
            id,
            message: message("t/x"),
            from: None,
            max_queued: 10,
        };
        let first = s.apply(batch(1, vec![publish.clone()]));
        assert_eq!(
            first,
            Outcome::Batch(vec![Outcome::Published { queued: 1, full: 0 }])
        );
        // Delivered and acknowledged: forgotten.
        let forget = Command::SessionProgress {
            client_id: "a".into(),
            node: 1,
            epoch,
            steps: vec![Step::Forget { id }],
        };
        assert_eq!(s.apply(forget), Outcome::Progressed { ignored: 0 });
        // The repeat answers as the first did and queues nothing.
        let mut effects = Vec::new();
        assert_eq!(
            s.apply_with(batch(1, vec![publish.clone()]), &mut effects),
            first
        );
        assert!(effects.is_empty());
        assert!(s.session_data("a").is_some_and(|d| d.queue.is_empty()));
        // A later batch applies; an earlier one after it does not.
        let later = Command::Publish {
            id: MessageId { counter: 2, ..id },
            message: message("t/y"),
            from: None,
            max_queued: 10,
        };
        assert!(matches!(s.apply(batch(3, vec![later])), Outcome::Batch(_)));
        assert!(matches!(
            s.apply(batch(2, vec![publish.clone()])),
            Outcome::Rejected(Rejection::StaleBatch {
                seq: 2,
                latest: 3,
                ..
            })
        ));
        assert_eq!(s.session_data("a").map(|d| d.queue.len()), Some(1));
        // A new incarnation numbers from 1 again; the old one's stragglers are stale.
        let restarted = Command::Sequenced {
            node: 2,
            incarnation: 2,
            seq: 1,
            commands: vec![],
        };
        assert_eq!(s.apply(restarted), Outcome::Batch(vec![]));
        assert!(matches!(
            s.apply(batch(4, vec![publish])),
            Outcome::Rejected(Rejection::StaleBatch { .. })
        ));
        // The numbering survives a snapshot.
        let copy = ClusterState::from_bytes(&s.to_bytes().unwrap()).unwrap();
        assert_eq!(copy.batches, s.batches);
    }

    #[test]
    fn the_old_owner_releases_its_epoch() {
        let mut s = ClusterState::default();
        let first = claim(&mut s, "c", 1);
        let second = claim(&mut s, "c", 2);
        assert_eq!(s.session("c").map(|o| o.released), Some(0));
        let released = |node, epoch| Command::Released {
            client_id: "c".into(),
            node,
            epoch,
        };
        assert_eq!(s.apply(released(1, first)), Outcome::Done);
        assert_eq!(s.session("c").map(|o| o.released), Some(first));
        let _ = s.apply(released(1, 99));
        assert_eq!(s.session("c").map(|o| o.released), Some(second));
        assert_eq!(claim(&mut s, "c", 3), second + 1);
        assert_eq!(s.session("c").map(|o| o.released), Some(second));
        assert_eq!(
            s.apply(released(1, 1)),
            Outcome::Done,
            "unknown sessions: nothing"
        );
    }

    #[test]
    fn retained_set_and_delete() {
        let mut s = ClusterState::default();
        let m = Retained {
            payload: b"21.5".to_vec(),
            qos: 1,
            ..Retained::default()
        };
        s.apply(Command::SetRetained {
            topic: "t/1".into(),
            message: m.clone(),
        });
        assert_eq!(s.retained("t/1"), Some(&m));
        s.apply(Command::DeleteRetained {
            topic: "t/1".into(),
        });
        assert_eq!(s.retained_count(), 0);
    }

    #[test]
    fn snapshot_round_trip() {
        let mut s = ClusterState::default();
        s.apply(Command::NodeUp {
            now_ms: 0,
            node: 1,
            name: "a".into(),
            incarnation: 1,
        });
        claim(&mut s, "c1", 1);
        claim(&mut s, "c1", 1);
        s.apply(Command::SetRetained {
            topic: "x".into(),
            message: Retained {
                payload: vec![0, 255],
                qos: 2,
                ..Retained::default()
            },
        });
        let bytes = s.to_bytes().unwrap();
        let back = ClusterState::from_bytes(&bytes).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.session("c1").map(|o| o.epoch), Some(2));
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    fn step() -> impl Strategy<Value = Step> {
        let pid = 1u16..4;
        prop_oneof![
            (0u64..6, prop::option::of(pid.clone()))
                .prop_map(|(seq, packet_id)| Step::Sent { seq, packet_id }),
            pid.clone().prop_map(|packet_id| Step::Acked { packet_id }),
            pid.clone()
                .prop_map(|packet_id| Step::Received { packet_id }),
            pid.clone()
                .prop_map(|packet_id| Step::InboundReceived { packet_id }),
            pid.prop_map(|packet_id| Step::InboundReleased { packet_id }),
            (prop::sample::select(FILTERS.to_vec()), 0u8..3).prop_map(|(filter, qos)| {
                Step::Subscribe {
                    filter: filter.into(),
                    options: SubscriptionOptions {
                        qos,
                        no_local: false,
                        retain_as_published: false,
                        identifier: None,
                    },
                }
            }),
            prop::sample::select(FILTERS.to_vec()).prop_map(|filter| Step::Unsubscribe {
                filter: filter.into()
            }),
        ]
    }

    const FILTERS: [&str; 6] = ["a/b", "a/+", "a/#", "#", "$SYS/#", "$share/g/a/b"];
    const TOPICS: [&str; 5] = ["a/b", "a/c", "a", "x", "$SYS/x"];

    /// What `persistent_matches` must find, by scanning every session's subscriptions.
    fn scanned(s: &ClusterState, topic: &str) -> Vec<(String, String, u8)> {
        let mut found: Vec<_> = s
            .contents
            .iter()
            .flat_map(|(id, d)| {
                d.subscriptions
                    .iter()
                    .filter(|(f, _)| {
                        !f.starts_with("$share/") && crate::routes::tests::naive_match(f, topic)
                    })
                    .map(move |(f, o)| (id.clone(), f.clone(), o.qos))
            })
            .collect();
        found.sort();
        found
    }

    fn matched(s: &ClusterState, topic: &str) -> Vec<(String, String, u8)> {
        let mut found: Vec<_> = s
            .persistent_matches(topic)
            .into_iter()
            .map(|m| (m.client_id.to_owned(), m.filter.to_owned(), m.options.qos))
            .collect();
        found.sort();
        found
    }

    fn command() -> impl Strategy<Value = Command> {
        let id = prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from);
        let node = 1u64..4;
        let epoch = 0u64..12;
        let at = prop::option::of(0u64..100);
        prop_oneof![
            (id.clone(), node.clone(), at.clone(), any::<bool>(), 0u64..3).prop_map(
                |(client_id, node, expires_at_ms, clean, incarnation)| Command::ClaimSession {
                    owner_quiet_ms: 0,
                    not_after_ms: 0,
                    incarnation,
                    client_id,
                    node,
                    expires_at_ms,
                    clean,
                }
            ),
            (
                id.clone(),
                node.clone(),
                epoch.clone(),
                at,
                prop::option::of(0u32..100)
            )
                .prop_map(|(client_id, node, epoch, expires_at_ms, interval_secs)| {
                    Command::SetSessionExpiry {
                        interval_secs,
                        client_id,
                        node,
                        epoch,
                        expires_at_ms,
                    }
                }),
            (id.clone(), node.clone(), epoch.clone()).prop_map(|(client_id, node, epoch)| {
                Command::DropSession {
                    client_id,
                    node,
                    epoch,
                }
            }),
            (0u64..100).prop_map(|now_ms| Command::ExpireSessions { now_ms }),
            (
                prop::collection::vec((id.clone(), 0u8..3), 0..3),
                1u32..4,
                0u64..4
            )
                .prop_map(|(targets, max_queued, counter)| Command::Enqueue {
                    id: MessageId {
                        node: 1,
                        incarnation: 1,
                        counter,
                    },
                    message: StoredMessage {
                        topic: "t".into(),
                        payload: vec![1],
                        qos: 2,
                        retain: false,
                        properties: Default::default(),
                    },
                    targets,
                    max_queued,
                }),
            (
                id.clone(),
                node.clone(),
                epoch.clone(),
                prop::collection::vec(step(), 0..4)
            )
                .prop_map(|(client_id, node, epoch, steps)| Command::SessionProgress {
                    client_id,
                    node,
                    epoch,
                    steps,
                }),
            (prop::sample::select(TOPICS.to_vec()), 1u32..4, 0u64..4).prop_map(
                |(topic, max_queued, counter)| Command::Publish {
                    id: MessageId {
                        node: 2,
                        incarnation: 1,
                        counter,
                    },
                    message: StoredMessage {
                        topic: topic.into(),
                        payload: vec![2],
                        qos: 1,
                        retain: false,
                        properties: Default::default(),
                    },
                    from: None,
                    max_queued,
                }
            ),
            (node.clone(), 0u64..5).prop_map(|(node, incarnation)| Command::NodeUp {
                now_ms: 0,
                node,
                name: format!("n{node}"),
                incarnation,
            }),
            (node.clone(), 0u64..3, 0u64..100).prop_map(|(node, incarnation, now_ms)| {
                Command::NodeDown {
                    node,
                    incarnation,
                    now_ms,
                }
            }),
            (node, 0u64..200).prop_map(|(by, now_ms)| Command::PublishWills { by, now_ms }),
        ]
    }

    proptest! {
        /// Whatever the history: a rejected command changes nothing, a session command is
        /// accepted only from the owner with the current epoch, every claim hands out an epoch
        /// above all before it, and the state survives a snapshot round trip.
        #[test]
        fn fencing_holds_for_any_history(commands in prop::collection::vec(command(), 1..60)) {
            let mut s = ClusterState::default();
            let mut highest = 0;
            for c in commands {
                let before = s.clone();
                let owner = match &c {
                    Command::SetSessionExpiry { client_id, .. }
                    | Command::DropSession { client_id, .. }
                    | Command::SessionProgress { client_id, .. } => {
                        before.session(client_id).map(|o| (o.owner, o.epoch))
                    }
                    _ => None,
                };
                let outcome = s.apply(c.clone());
                match (&c, &outcome) {
                    (_, Outcome::Rejected(_)) => prop_assert_eq!(&s, &before),
                    (Command::SetSessionExpiry { node, epoch, .. }, Outcome::Done)
                    | (Command::DropSession { node, epoch, .. }, Outcome::Done)
                    | (Command::SessionProgress { node, epoch, .. }, Outcome::Progressed { .. }) => {
                        prop_assert_eq!(owner, Some((*node, *epoch)));
                    }
                    (Command::ClaimSession { .. }, Outcome::Claimed { epoch, .. }) => {
                        prop_assert!(*epoch > highest);
                        highest = *epoch;
                    }
                    // Nothing the gone node owned under that life is served any more, and
                    // the epochs it held are all stale.
                    (Command::NodeDown { node, incarnation, .. }, _) => {
                        prop_assert!(!s.serves_sessions(*node, *incarnation));
                        for (id, o) in &s.sessions {
                            if let Some(was) = before.session(id) {
                                if was.owner == *node && was.incarnation <= *incarnation {
                                    prop_assert!(o.orphaned && o.epoch >= was.epoch);
                                }
                            }
                        }
                        highest = highest.max(s.last_epoch);
                    }
                    _ => {}
                }
            }
            // Contents exist exactly for the sessions there are, and a message is never both
            // queued and in flight.
            prop_assert!(s.contents.keys().eq(s.sessions.keys()));
            for data in s.contents.values() {
                for f in data.in_flight.values() {
                    prop_assert!(data.queue.iter().all(|q| q.seq != f.seq));
                }
                // `held` indexes exactly what is queued or in flight.
                let mut held: Vec<_> = data.queue.iter().map(|q| (q.id, q.seq))
                    .chain(data.in_flight.values().map(|f| (f.id, f.seq))).collect();
                held.sort();
                prop_assert!(held.into_iter().eq(data.held.iter().map(|(i, s)| (*i, *s))));
            }
            // The index of persistent subscriptions finds what a scan finds, before and after a
            // snapshot round trip (which rebuilds it).
            let mut indexed: Vec<(String, String)> = s.index.trie.all().into_iter()
                .map(|(c, f)| (c.into(), f.into())).collect();
            indexed.sort();
            let mut subscribed: Vec<(String, String)> = s.contents.iter()
                .flat_map(|(c, d)| d.subscriptions.keys().map(move |f| (c.clone(), f.clone())))
                .filter(|(_, f)| !f.starts_with("$share/"))
                .collect();
            subscribed.sort();
            prop_assert_eq!(indexed, subscribed, "the index holds what the sessions hold, no more");
            let copy = ClusterState::from_bytes(&s.to_bytes().unwrap()).unwrap();
            for topic in TOPICS {
                prop_assert_eq!(matched(&s, topic), scanned(&s, topic), "topic {}", topic);
                prop_assert_eq!(matched(&copy, topic), scanned(&s, topic), "topic {}", topic);
            }
            prop_assert_eq!(copy, s);
        }
    }
}
