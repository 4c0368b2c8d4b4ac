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

use crate::session::{EnqueueResult, MessageId, SessionData, Step, StoredMessage};

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
}

/// A retained message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retained {
    /// The message's payload.
    pub payload: Vec<u8>,
    /// Its QoS (0, 1 or 2).
    pub qos: u8,
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
    },
    /// A node left the cluster for good.
    NodeRemoved {
        /// The node.
        node: NodeId,
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
    /// A node announced an incarnation not above the one recorded.
    #[error("stale incarnation {given} (recorded {current})")]
    StaleIncarnation {
        /// The incarnation in the command.
        given: u64,
        /// The one recorded.
        current: u64,
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
    /// Nothing changed.
    Rejected(Rejection),
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
}

impl ClusterState {
    /// Applies one committed command.
    pub fn apply(&mut self, command: Command) -> Outcome {
        match command {
            Command::NodeUp {
                node,
                name,
                incarnation,
            } => {
                if let Some(known) = self.nodes.get(&node) {
                    if incarnation <= known.incarnation {
                        return Outcome::Rejected(Rejection::StaleIncarnation {
                            given: incarnation,
                            current: known.incarnation,
                        });
                    }
                }
                self.nodes.insert(node, NodeRecord { name, incarnation });
                Outcome::Done
            }
            Command::NodeRemoved { node } => {
                self.nodes.remove(&node);
                Outcome::Done
            }
            Command::ClaimSession {
                client_id,
                node,
                expires_at_ms,
                clean,
            } => {
                let previous = self.sessions.get(&client_id).map(|s| (s.owner, s.epoch));
                let present = previous.is_some() && !clean;
                if !present {
                    self.contents
                        .insert(client_id.clone(), SessionData::default());
                }
                // One counter for all sessions: an epoch is never reused, not even by a session
                // dropped and created again, so a command from its earlier life stays stale.
                self.last_epoch = self.last_epoch.saturating_add(1);
                let epoch = self.last_epoch;
                self.sessions.insert(
                    client_id,
                    SessionOwner {
                        owner: node,
                        epoch,
                        expires_at_ms,
                    },
                );
                Outcome::Claimed {
                    epoch,
                    previous,
                    present,
                }
            }
            Command::SetSessionExpiry {
                client_id,
                node,
                epoch,
                expires_at_ms,
            } => match self.fenced(&client_id, node, epoch) {
                Ok(()) => {
                    if let Some(s) = self.sessions.get_mut(&client_id) {
                        s.expires_at_ms = expires_at_ms;
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
                    self.sessions.remove(&client_id);
                    self.contents.remove(&client_id);
                    Outcome::Done
                }
                Err(r) => Outcome::Rejected(r),
            },
            Command::ExpireSessions { now_ms } => {
                let before = self.sessions.len();
                self.sessions
                    .retain(|_, s| s.expires_at_ms.is_none_or(|at| at > now_ms));
                let sessions = &self.sessions;
                self.contents.retain(|id, _| sessions.contains_key(id));
                Outcome::Expired {
                    count: before - self.sessions.len(),
                }
            }
            Command::Enqueue {
                id,
                message,
                targets,
                max_queued,
            } => {
                let results = targets
                    .into_iter()
                    .map(|(client_id, qos)| match self.contents.get_mut(&client_id) {
                        Some(data) => data.enqueue(id, message.clone(), qos, max_queued),
                        None => EnqueueResult::NoSession,
                    })
                    .collect();
                Outcome::Enqueued { results }
            }
            Command::SessionProgress {
                client_id,
                node,
                epoch,
                steps,
            } => match self.fenced(&client_id, node, epoch) {
                Ok(()) => {
                    let data = self.contents.entry(client_id).or_default();
                    let ignored = steps.into_iter().filter(|s| !data.step(s.clone())).count();
                    Outcome::Progressed { ignored }
                }
                Err(r) => Outcome::Rejected(r),
            },
            Command::SetRetained { topic, message } => {
                self.retained.insert(topic, message);
                Outcome::Done
            }
            Command::DeleteRetained { topic } => {
                self.retained.remove(&topic);
                Outcome::Done
            }
        }
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

    /// The state as bytes (a snapshot).
    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// The state from a snapshot's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(s: &mut ClusterState, id: &str, node: NodeId) -> u64 {
        match s.apply(Command::ClaimSession {
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
            options: crate::session::SubscriptionOptions {
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
    fn sessions_expire_at_the_time_in_the_command() {
        let mut s = ClusterState::default();
        for (id, at) in [("a", Some(100)), ("b", Some(200)), ("c", None)] {
            s.apply(Command::ClaimSession {
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
        s.apply(Command::NodeRemoved { node: 3 });
        assert!(s.nodes().is_empty());
    }

    #[test]
    fn retained_set_and_delete() {
        let mut s = ClusterState::default();
        let m = Retained {
            payload: b"21.5".to_vec(),
            qos: 1,
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
        ]
    }

    fn command() -> impl Strategy<Value = Command> {
        let id = prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from);
        let node = 1u64..4;
        let epoch = 0u64..12;
        let at = prop::option::of(0u64..100);
        prop_oneof![
            (id.clone(), node.clone(), at.clone(), any::<bool>()).prop_map(
                |(client_id, node, expires_at_ms, clean)| Command::ClaimSession {
                    client_id,
                    node,
                    expires_at_ms,
                    clean,
                }
            ),
            (id.clone(), node.clone(), epoch.clone(), at).prop_map(
                |(client_id, node, epoch, expires_at_ms)| Command::SetSessionExpiry {
                    client_id,
                    node,
                    epoch,
                    expires_at_ms,
                }
            ),
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
            (node, 0u64..5).prop_map(|(node, incarnation)| Command::NodeUp {
                node,
                name: format!("n{node}"),
                incarnation,
            }),
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
            prop_assert_eq!(ClusterState::from_bytes(&s.to_bytes().unwrap()).unwrap(), s);
        }
    }
}
