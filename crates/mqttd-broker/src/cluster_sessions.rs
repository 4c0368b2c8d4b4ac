//! Persistent sessions in a cluster: a client may connect to any node and resume its session
//! there, and a node may die without losing what the cluster acknowledged.
//!
//! - **Claim.** A CONNECT for a persistent session proposes `ClaimSession` to the cluster
//!   ([`Inner::acquire_in_cluster`]). Without a quorum the claim cannot commit and the
//!   CONNECT is refused with 0x88 (return code 3 for MQTT 3.1.1). Once it is applied here,
//!   the session is this node's under the new epoch ([`ClusterStorage::own`]); if it was
//!   another node's, it is built from the replicated contents: subscriptions, the messages
//!   in flight (sent again with their packet ids) and queued, and the client's QoS 2 state.
//! - **Publications** to persistent sessions go through Raft: the publishing node records
//!   `Publish` in the same batch as the publication's other changes, so PUBACK and PUBREC
//!   wait for its commit, and the sessions are found when the entry is applied. The broker's
//!   own routing skips the sessions the cluster owns for these copies ([`Inner::owned_by_cluster`]).
//! - **Effects** of applied entries ([`Effects`]): the owner hands a message queued for a
//!   session to its connection (or its offline queue); a node whose session another node
//!   claimed disconnects its client with 0x8E and forgets the session without ending it.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use mqttd_cluster::session::{
    Delivered, MessageId, Queued, SessionData, StoredMessage, StoredWill,
};
use mqttd_cluster::state::Retained;
use mqttd_cluster::{ApplyHook, Command, Effect, NodeError, Outcome, Proposer};
use mqttd_proto::session::{OutboundState, Session};
use mqttd_proto::{ClientId, Delivery, PacketId, QoS, ReasonCode, TopicFilter, TopicName};

use crate::broker::{Acquired, Headed, Inner, Mailbox, SessionHandle, Slot};
use crate::cluster::BrokerCluster;
use crate::cluster_storage::{retained_message, to_message, ClusterStorage};
use crate::core::SessionRequest;

/// How long a claim may take before the CONNECT is refused (no quorum: a minority side).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);

/// How much earlier than [`CLAIM_TIMEOUT`] a claim's deadline falls (`not_after_ms`): the
/// leader checks it by its own clock, which may run ahead of this node's by as much.
const CLAIM_SKEW: Duration = Duration::from_secs(1);

/// How long the new owner of a session taken from another node waits for that node to let
/// it go before answering CONNACK: the lease of the old owner, counted from when the old
/// owner last proposed anything the claim comes after (the claim's `owner_quiet_ms`, which
/// the leader sets). What the old owner sends waits for such a proposal's commit, learned
/// within `LATE_COMMIT` (2 s, `cluster_storage.rs`) of it; the lease is 1 s longer. A node
/// cut off from the cluster cannot release; it only holds what it had queued, which the new
/// owner sends again.
const LEASE: Duration = Duration::from_secs(3);

/// How long the old owner waits for its connection to close before releasing anyway.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Connects the broker's storage and sessions to the cluster node, once it has started:
/// session commands go through a proposer (group commit), and applied entries' effects come
/// back to [`Effects`].
pub(crate) fn attach(inner: &Arc<Inner>, cluster: &Arc<BrokerCluster>) {
    let Some(storage) = inner.cluster_storage.get() else {
        return;
    };
    let node = cluster.node();
    let proposing = cluster.clone();
    let settling = Arc::downgrade(storage);
    let proposer = Proposer::start(
        &inner.tasks,
        inner.shutdown.clone(),
        (node.id(), node.incarnation()),
        move |command| {
            let cluster = proposing.clone();
            Box::pin(async move {
                cluster
                    .node()
                    .propose(command)
                    .await
                    .map_err(|e| e.to_string())
            })
        },
        move |settled| {
            if let Some(storage) = settling.upgrade() {
                storage.settled(settled);
            }
        },
    );
    storage.attach(node.id(), node.incarnation(), proposer);
    // A refused session command: another node has the session. Let it go here, and once
    // its connection has closed, let what waited for the command go on (to nowhere).
    let refusing = Arc::downgrade(inner);
    let unholding = Arc::downgrade(storage);
    storage.on_refused(move |client_id| {
        let (Some(inner), Some(storage)) = (refusing.upgrade(), unholding.upgrade()) else {
            return;
        };
        if let (Some(epoch), Some(me)) = (storage.disown(&client_id, None), storage.node_id()) {
            // Told before this node applied the claim: let the session go as that would.
            let closed = inner.surrender(&client_id);
            release(&inner, client_id, me, epoch, closed);
        } else if !storage.is_surrendered(&client_id) {
            // Let go before, and its connection here closed since: nothing is left to cut.
            storage.unhold(&client_id);
        }
        // Else it is being let go ([`release`]): what is held goes on once its connection
        // has closed, and not before, lest a refused change's answer reach the client.
    });
    node.on_apply(Arc::new(Effects(Arc::downgrade(inner))));
    // After the hook, so that no change applied meanwhile is missed.
    inner.take_cluster_retained(cluster);
}

/// What applied entries tell this node to do (see the module's documentation).
struct Effects(Weak<Inner>);

impl ApplyHook for Effects {
    fn applied(&self, effects: Vec<Effect>) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        let Some(storage) = inner.cluster_storage.get() else {
            return;
        };
        let Some(me) = storage.node_id() else {
            return;
        };
        let _turn = inner.cluster_apply.lock();
        let now = crate::clock::now();
        for effect in effects {
            match effect {
                Effect::Queued {
                    client_id,
                    owner,
                    epoch,
                    seq,
                    id,
                    qos,
                    delivered,
                    message,
                } if owner == me => {
                    if let Ok(client_id) = ClientId::try_from(client_id.as_str()) {
                        let queued = Queued {
                            seq,
                            id,
                            qos,
                            message: *message,
                            delivered,
                        };
                        inner.hand_queued(now, storage, &client_id, epoch, &queued);
                    }
                }
                Effect::Claimed {
                    client_id,
                    owner,
                    previous: Some((previous, epoch)),
                    ..
                } if previous == me && owner != me => {
                    let Ok(client_id) = ClientId::try_from(client_id.as_str()) else {
                        continue;
                    };
                    tracing::debug!(client_id = %client_id, owner, epoch, "session claimed by another node");
                    let_go(&inner, storage, client_id, me, epoch);
                }
                Effect::Claimed {
                    client_id,
                    owner,
                    epoch,
                    previous: Some((previous, old)),
                } if previous == me && owner == me => {
                    // Claimed again here: what is queued under the new claim from now on is
                    // delivered here, even before the claim's proposer has seen its outcome.
                    if let Ok(client_id) = ClientId::try_from(client_id.as_str()) {
                        storage.renew(&client_id, old, epoch);
                    }
                }
                Effect::Orphaned {
                    client_id,
                    owner,
                    epoch,
                } if owner == me => {
                    // The leader took this node for gone (it was cut off, or paused): its
                    // clients go, as if another node had claimed their sessions.
                    let Ok(client_id) = ClientId::try_from(client_id.as_str()) else {
                        continue;
                    };
                    tracing::debug!(client_id = %client_id, epoch, "session orphaned: this node was taken for gone");
                    let_go(&inner, storage, client_id, me, epoch);
                }
                Effect::Will {
                    by,
                    client_id,
                    will,
                } if by == me => inner.publish_cluster_will(now, &client_id, &will),
                Effect::Retained { topic, message } => {
                    inner.serve_retained(&topic, message.as_ref());
                }
                _ => {}
            }
        }
    }

    fn replaced(&self) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        if let Some(cluster) = inner.cluster.get().cloned() {
            inner.take_cluster_retained(&cluster);
            take_cluster_sessions(&inner, &cluster);
        }
    }
}

/// After a snapshot from the leader replaced the state, does for each session this node
/// serves what the entries the snapshot covers would have told it one by one: a session
/// another node claimed (or that was orphaned, or ended) is let go; one still this node's
/// gets the messages queued for it that it was not handed.
fn take_cluster_sessions(inner: &Arc<Inner>, cluster: &BrokerCluster) {
    let Some(storage) = inner.cluster_storage.get() else {
        return;
    };
    let Some(me) = storage.node_id() else {
        return;
    };
    let _turn = inner.cluster_apply.lock();
    let now = crate::clock::now();
    for (client_id, epoch, from_seq) in storage.owned_sessions() {
        let current = cluster
            .node()
            .state()
            .read(|s| s.session(client_id.as_str()).map(|o| (o.owner, o.epoch)));
        match current {
            Some((owner, now_epoch)) if owner == me && now_epoch >= epoch => {
                // Claimed again here meanwhile: as `Effect::Claimed` would.
                storage.renew(&client_id, epoch, now_epoch);
                let missed: Vec<Queued> = cluster.node().state().read(|s| {
                    s.session_data(client_id.as_str())
                        .map_or_else(Vec::new, |d| {
                            d.queue
                                .iter()
                                .filter(|q| q.seq >= from_seq)
                                .cloned()
                                .collect()
                        })
                });
                for q in &missed {
                    inner.hand_queued(now, storage, &client_id, now_epoch, q);
                }
            }
            _ => {
                tracing::debug!(client_id = %client_id, epoch, "session no longer this node's, learned from a snapshot");
                let_go(inner, storage, client_id, me, epoch);
            }
        }
    }
}

/// Proposes `command`, again whenever it did not reach a leader (none known yet, or the one it
/// was forwarded to stopped leading): a CONNECT made during an election commits its claim
/// once a leader is elected, not after the caller's timeout. A claim proposed twice (the
/// first committed, its answer lost) only takes one more epoch.
async fn propose_until_led(
    cluster: &BrokerCluster,
    command: Command,
) -> Result<Outcome, NodeError> {
    loop {
        match cluster.node().propose(command.clone()).await {
            Err(NodeError::NotLeader { .. } | NodeError::Forward(_)) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answer => return answer,
        }
    }
}

/// Lets go of a session this node held under `epoch` and no longer owns: its client is
/// disconnected (0x8E) and forgotten without ending the session, then [`release`]d.
fn let_go(inner: &Arc<Inner>, storage: &ClusterStorage, client_id: ClientId, me: u64, epoch: u64) {
    if storage.disown(&client_id, Some(epoch)).is_some() {
        let closed = inner.surrender(&client_id);
        release(inner, client_id, me, epoch, closed);
    }
}

/// Tells the cluster that this node let the session go (its connection here closed, or
/// [`RELEASE_WAIT`] passed), so that its new owner answers CONNACK without waiting for the
/// lease.
fn release(
    inner: &Arc<Inner>,
    client_id: ClientId,
    me: u64,
    epoch: u64,
    closed: Option<tokio::sync::oneshot::Receiver<()>>,
) {
    let cluster = inner.cluster.get().cloned();
    let storage = inner.cluster_storage.get().cloned();
    inner.tasks.spawn(async move {
        if let Some(closed) = closed {
            let _ = tokio::time::timeout(RELEASE_WAIT, closed).await;
        }
        // The connection has closed: what it recorded since the takeover goes nowhere.
        if let Some(storage) = &storage {
            storage.unhold(&client_id);
        }
        let Some(cluster) = cluster else { return };
        let released = Command::Released {
            client_id: client_id.as_str().to_owned(),
            node: me,
            epoch,
        };
        if let Err(e) = cluster.node().propose(released).await {
            tracing::debug!(client_id = %client_id, error = %e, "release not proposed; the new owner waits for the lease");
        }
    });
}

impl Inner {
    /// Serves what the cluster holds as `topic`'s retained message here (`None`: deleted).
    /// The cluster decides: its limits were checked where the message was published.
    fn serve_retained(&self, topic: &str, message: Option<&Retained>) {
        let message = match message {
            Some(r) => retained_message(topic, r),
            None => TopicName::try_from(topic)
                .ok()
                .map(|t| mqttd_proto::Message::new(t, Vec::new(), QoS::AtMostOnce, true)),
        };
        if let Some(message) = message {
            self.retained.set(Arc::new(message));
        }
    }

    /// Makes this node's retained messages the cluster's: at start (what changed while it
    /// was down, or all of it if it just joined: a node's own earlier ones not in the
    /// cluster are dropped) and when a snapshot from the leader replaced its state.
    pub(crate) fn take_cluster_retained(&self, cluster: &BrokerCluster) {
        let _turn = self.cluster_apply.lock();
        let held: HashMap<String, Retained> = cluster.node().state().read(|s| {
            s.retained_messages()
                .map(|(t, r)| (t.to_owned(), r.clone()))
                .collect()
        });
        for message in self.retained.all() {
            if !held.contains_key(message.topic.as_str()) {
                self.serve_retained(message.topic.as_str(), None);
            }
        }
        for (topic, r) in &held {
            self.serve_retained(topic, Some(r));
        }
    }

    /// Whether a persistent session anywhere in the cluster has a subscription matching a
    /// QoS 1 or 2 message, as this node's copy of the state says (for PUBACK's reason: the
    /// cluster queues the message for it, although no local subscriber got it).
    pub(crate) fn cluster_subscribed(&self, message: &mqttd_proto::Message) -> bool {
        message.qos != QoS::AtMostOnce
            && self.cluster.get().is_some_and(|c| {
                c.node()
                    .state()
                    .read(|s| !s.persistent_matches(message.topic.as_str()).is_empty())
            })
    }

    /// Whether the cluster owns the session of `handle`: its QoS 1 and 2 copies come from
    /// the cluster's `Publish`, not from this node's routing.
    pub(crate) fn owned_by_cluster(&self, handle: &SessionHandle) -> bool {
        self.cluster_storage
            .get()
            .is_some_and(|s| s.owned(&handle.client_id).is_some())
    }

    /// Answers a CONNECT for a persistent session in a cluster (see the module's
    /// documentation).
    pub(crate) async fn acquire_in_cluster(
        &self,
        now: Instant,
        request: &SessionRequest,
        mailbox: &Arc<Mailbox>,
        storage: &Arc<ClusterStorage>,
    ) -> Acquired {
        let client_id = &request.client_id;
        let refuse = |reason| self.refused(client_id, request.expiry, reason);
        let (Some(cluster), Some(me)) = (self.cluster.get(), storage.node_id()) else {
            return refuse(ReasonCode::ServerUnavailable);
        };
        // Held here, resumed here: a takeover between connections of this node, under the
        // same claim, as without a cluster (a new epoch would fence off what the old
        // connection's session recorded and is still proposing). A clean start claims anew.
        // The claim is confirmed first: a node cut off from the cluster, or behind it, may
        // not have learned yet that another node took the session.
        if let Some(epoch) = storage
            .owned(client_id)
            .filter(|_| !request.clean_start && self.sessions.contains_key(client_id))
        {
            let confirm = Command::SessionProgress {
                client_id: client_id.as_str().to_owned(),
                node: me,
                epoch,
                steps: Vec::new(),
            };
            match tokio::time::timeout(CLAIM_TIMEOUT, propose_until_led(cluster, confirm)).await {
                // Still this node's, unless it let the session go meanwhile (a refusal).
                Ok(Ok(Outcome::Progressed { .. }))
                    if storage.owned(client_id) == Some(epoch)
                        && self.sessions.contains_key(client_id) =>
                {
                    tracing::debug!(client_id = %client_id, "session resumed here under its claim");
                    let acquired = self
                        .acquire_session(now, client_id, false, request.expiry, mailbox)
                        .await;
                    if storage.owned(client_id) == Some(epoch) {
                        return acquired;
                    }
                    // Let go while it moved here: its client connects again and claims it.
                    tracing::debug!(client_id = %client_id, "the session was let go while it moved here");
                    self.sessions
                        .remove_if(client_id, |_, h| Arc::ptr_eq(h, &acquired.handle));
                    *acquired.handle.slot.lock() = Slot::Ended;
                    self.release_session(&acquired.handle);
                    return refuse(ReasonCode::ServerUnavailable);
                }
                // Another node took it: claimed anew below, and built from the cluster.
                Ok(Ok(_)) => {
                    tracing::debug!(client_id = %client_id, "the claim held here is stale");
                }
                Ok(Err(_)) | Err(_) => {
                    tracing::info!(client_id = %client_id, "no quorum to confirm the session: CONNECT refused");
                    return refuse(ReasonCode::ServerUnavailable);
                }
            }
        }
        let claim = Command::ClaimSession {
            // The leader's to set.
            owner_quiet_ms: 0,
            // Not appended once this CONNECT has been refused for want of it.
            not_after_ms: crate::cluster::unix_ms(
                std::time::SystemTime::now() + CLAIM_TIMEOUT - CLAIM_SKEW,
            ),
            incarnation: cluster.node().incarnation(),
            client_id: client_id.as_str().to_owned(),
            node: me,
            expires_at_ms: None,
            clean: request.clean_start,
        };
        let outcome = match tokio::time::timeout(CLAIM_TIMEOUT, propose_until_led(cluster, claim))
            .await
        {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(NodeError::NotLeader { .. })) | Ok(Err(_)) | Err(_) => {
                tracing::info!(client_id = %client_id, "no quorum to claim the session: CONNECT refused");
                return refuse(ReasonCode::ServerUnavailable);
            }
        };
        let Outcome::Claimed {
            epoch,
            previous,
            present,
            will,
            owner_quiet_ms,
        } = outcome
        else {
            tracing::info!(client_id = %client_id, ?outcome, "claim refused: CONNECT refused");
            return refuse(ReasonCode::ServerUnavailable);
        };
        // Held here before: the session (if any) is in this node's memory, as without a
        // cluster; only the epoch moves on.
        if let Some((owner, old)) = previous {
            if owner == me
                && storage
                    .owned(client_id)
                    .is_some_and(|e| e == old || e == epoch)
            {
                tracing::debug!(client_id = %client_id, old, epoch, "session claimed again here");
                // The old connection's will is in this node's memory, and the takeover
                // below publishes it or not, as without a cluster.
                drop(will);
                storage.renew(client_id, old, epoch);
                return self
                    .acquire_session(now, client_id, request.clean_start, request.expiry, mailbox)
                    .await;
            }
        }
        // Another node's, or new: wait until this node has applied the claim, then build the
        // session from the replicated contents.
        let deadline = tokio::time::Instant::now() + CLAIM_TIMEOUT;
        loop {
            let applied = cluster.node().state().read(|s| {
                s.session(client_id.as_str())
                    .is_some_and(|o| o.epoch >= epoch)
            });
            if applied {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return refuse(ReasonCode::ServerUnavailable);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Nothing may go out on the old owner's connection after this CONNACK: wait until it
        // has let the session go, or for what is left of its lease (the leader's word on how
        // long the old owner has been quiet).
        if let Some((owner, old)) = previous.filter(|(owner, _)| *owner != me) {
            let left = LEASE.saturating_sub(Duration::from_millis(owner_quiet_ms));
            let deadline = tokio::time::Instant::now() + left;
            while tokio::time::Instant::now() < deadline {
                let released = cluster.node().state().read(|s| {
                    s.session(client_id.as_str())
                        .is_some_and(|o| o.released >= old)
                });
                if released {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tracing::debug!(client_id = %client_id, from = owner, "session taken from another node");
        }
        // A session this node held under an older claim is not resumed from memory.
        if let Some((_, stale)) = self.sessions.remove(client_id) {
            let _closed = self.drop_local(&stale);
        }
        let _turn = self.cluster_apply.lock();
        let data: Option<SessionData> = cluster
            .node()
            .state()
            .read(|s| s.session_data(client_id.as_str()).cloned());
        tracing::debug!(
            client_id = %client_id,
            epoch,
            ?previous,
            present,
            from_seq = data.as_ref().map_or(0, |d| d.next_seq),
            queued = data.as_ref().map_or(0, |d| d.queue.len()),
            in_flight = data.as_ref().map_or(0, |d| d.in_flight.len()),
            "session built from the cluster"
        );
        storage.own(client_id, epoch, data.as_ref().map_or(0, |d| d.next_seq));
        let handle = self.new_handle(
            client_id,
            Slot::Online {
                mailbox: mailbox.clone(),
            },
        );
        let mut session = Session::new(
            client_id.clone(),
            request.expiry,
            self.config.queue_limits(),
        );
        if let Some(data) = data.filter(|_| present) {
            self.rebuild(now, storage, &handle, &mut session, data);
        }
        self.sessions.insert(client_id.clone(), handle.clone());
        drop(_turn);
        // The connection this claim ended (on a node that let it go, or died) left its will
        // here: due now, unless it has a delay and the session carries on (MQTT 5.0 3.1.3.2.2).
        if let Some(will) = will.filter(|w| !present || w.delay_secs == 0) {
            self.publish_cluster_will(now, client_id.as_str(), &will);
        }
        Acquired {
            handle,
            session,
            present,
            refused: None,
        }
    }

    /// Hands a message the cluster queued for a session (under `epoch`) to the session here,
    /// unless this node does not deliver it (not its claim, or read when the session was
    /// built); everything queued up to it counts as handed.
    fn hand_queued(
        &self,
        now: Instant,
        storage: &ClusterStorage,
        client_id: &ClientId,
        epoch: u64,
        q: &Queued,
    ) {
        let seq = q.seq;
        if !storage.delivers(client_id, epoch, seq) {
            tracing::trace!(client_id = %client_id, epoch, seq, "queued in the cluster, not delivered here");
            return;
        }
        storage.handed(client_id, seq);
        let Some(handle) = self.sessions.get(client_id).map(|h| h.clone()) else {
            tracing::debug!(client_id = %client_id, epoch, seq, "queued in the cluster for a session not held here");
            return;
        };
        let Some(delivery) =
            self.delivery_of(storage, client_id, q.id, q.qos, &q.message, &q.delivered)
        else {
            return;
        };
        if self.deliver_stored(now, &handle, delivery) {
            tracing::trace!(client_id = %client_id, epoch, seq, "queued in the cluster, handed to the session");
        } else {
            tracing::debug!(client_id = %client_id, epoch, seq, "queued in the cluster, dropped here");
            self.metrics.messages_dropped.inc();
        }
    }

    /// Publishes a will the cluster held for a connection that is gone (its session was
    /// claimed, or its node was found gone).
    fn publish_cluster_will(&self, now: Instant, client_id: &str, will: &StoredWill) {
        match to_message(&will.message) {
            Some(message) => {
                tracing::debug!(client_id, topic = %will.message.topic, "will of a connection that is gone");
                self.publish_will(now, message);
            }
            None => tracing::warn!(client_id, "a will in the cluster is not valid MQTT"),
        }
    }

    /// The delivery of a message the cluster queued for a session, under a new local
    /// sequence number that the storage maps to its identity; `None` if it is not valid MQTT
    /// (the cluster only holds what nodes running this code stored).
    fn delivery_of(
        &self,
        storage: &ClusterStorage,
        client_id: &ClientId,
        id: MessageId,
        qos: u8,
        message: &StoredMessage,
        delivered: &Delivered,
    ) -> Option<Delivery> {
        let message = to_message(message)?;
        let qos = QoS::from_bits(qos)?;
        let seq = self
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        storage.known(client_id, seq, id);
        Some(Delivery {
            message: Arc::new(message),
            qos,
            retain: delivered.retain,
            subscription_ids: delivered
                .subscription_ids
                .iter()
                .filter_map(|i| NonZeroU32::new(*i))
                .collect(),
            shared: None,
            store_seq: Some(seq),
        })
    }

    /// Puts what the cluster holds of a session into `session` and `handle`.
    fn rebuild(
        &self,
        now: Instant,
        storage: &ClusterStorage,
        handle: &Arc<SessionHandle>,
        session: &mut Session,
        data: SessionData,
    ) {
        let client_id = &handle.client_id;
        let delivery = |id, qos, message, delivered| {
            self.delivery_of(storage, client_id, id, qos, message, delivered)
        };
        for (packet_id, f) in data.in_flight_in_order() {
            let (Some(d), Some(packet_id)) = (
                delivery(f.id, f.qos, &f.message, &f.delivered),
                PacketId::new(packet_id),
            ) else {
                continue;
            };
            let state = if f.released {
                OutboundState::ReleaseSent
            } else {
                OutboundState::PublishSent
            };
            session.restore_in_flight(packet_id, d, state);
        }
        let queued: Vec<Delivery> = data
            .queue
            .iter()
            .filter_map(|q| delivery(q.id, q.qos, &q.message, &q.delivered))
            .collect();
        self.enqueue_all(now, client_id, Some(session), queued, Headed::Online);
        for packet_id in data.inbound_qos2.iter().filter_map(|p| PacketId::new(*p)) {
            session.restore_pending_release(packet_id);
        }
        handle
            .persistent
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let subscriptions = data.subscriptions.iter().filter_map(|(filter, o)| {
            let filter = TopicFilter::try_from(filter.as_str()).ok()?;
            let options = mqttd_proto::SubscriptionOptions {
                qos: QoS::from_bits(o.qos)?,
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
                ..Default::default()
            };
            Some((filter, options, o.identifier.and_then(NonZeroU32::new)))
        });
        self.restore_subscriptions(handle, subscriptions);
    }

    /// Hands a message the cluster queued for a session to wherever the session is here,
    /// without storing it again. Returns false if it was dropped.
    fn deliver_stored(&self, now: Instant, handle: &SessionHandle, delivery: Delivery) -> bool {
        let mut slot = handle.slot.lock();
        match &mut *slot {
            Slot::Online { mailbox } => mailbox
                .push(delivery, usize::MAX, |_| crate::storage::Ticket::NONE)
                .is_ok(),
            Slot::Transferring { buffer, .. } => {
                buffer.push(delivery);
                true
            }
            Slot::Offline { session, .. } => self.enqueue(now, session, &delivery, Headed::Offline),
            Slot::Ended => false,
        }
    }

    /// Another node claimed the session: its client here is disconnected (0x8E, session
    /// taken over) and the session forgotten without ending it (no will, nothing stored:
    /// it goes on elsewhere).
    /// Returns what resolves once its connection here has closed, if it had one.
    fn surrender(&self, client_id: &ClientId) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let (_, handle) = self.sessions.remove(client_id)?;
        self.drop_local(&handle)
    }

    /// Forgets a session here: its slot (a connection is told it was taken over), its
    /// subscriptions, its count.
    fn drop_local(
        &self,
        handle: &Arc<SessionHandle>,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let old = std::mem::replace(&mut *handle.slot.lock(), Slot::Ended);
        let closed = match old {
            Slot::Online { mailbox } => {
                let (tx, _session) = tokio::sync::oneshot::channel();
                let (stopped, rx) = tokio::sync::oneshot::channel();
                mailbox.take_over_as(crate::broker::SessionReply(tx), Some(stopped));
                Some(rx)
            }
            Slot::Transferring {
                from: Some(mailbox),
                ..
            } => {
                // Moving between two connections here: the one it was taken from may still
                // be sending its last words, and must not send what waited for the changes
                // the cluster refused once their holds are let go.
                mailbox.abandon_output();
                None
            }
            _ => None,
        };
        self.release_session(handle);
        closed
    }
}
