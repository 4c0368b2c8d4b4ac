//! Clustering for mqttd: several nodes as one broker.
//!
//! The cluster's shared state (its nodes and their incarnations, who owns each persistent
//! session and under which epoch, what each session holds, the retained messages) is
//! replicated with Raft, by [openraft](https://docs.rs/openraft) 0.9: no home-made consensus.
//! The crate's rooms:
//!
//! - [`state`]: the state machine proper, sans-IO: [`Command`]s in, [`Outcome`]s out, and the
//!   session fencing (a claim bumps the session's epoch; a command with another epoch is
//!   rejected). Deterministic, so that every node computes the same state. [`session`] holds
//!   what a persistent session keeps (subscriptions, queue, in flight, will).
//! - [`store`]: openraft's log store and state machine on fjall, in a directory of its own
//!   beside the broker's store: the log, the vote, the committed index and the latest snapshot
//!   survive a restart.
//! - [`network`]: Raft's RPCs between nodes over QUIC (noq) with mutual TLS: every node has a
//!   certificate from the cluster's CA and accepts only peers with one; ALPN `mqttd-cluster/1`.
//! - [`routes`] and [`router`]: the routes of clean sessions, *not* in Raft: each node streams
//!   its own to its peers (deltas tagged with node, incarnation and sequence; a snapshot on a
//!   gap), and messages for subscribers on other nodes are forwarded over a second QUIC link
//!   per peer, one stream per topic bucket ([`wire`] has the frames).
//!
//! [`ClusterNode`] puts them together: a node that listens, runs Raft and proposes commands
//! (on any node: a follower forwards them to the leader), and on the leader adds and removes
//! members.
//! [`config`] holds the `[cluster]` section. The broker starts a node when its configuration
//! has one (`mqttd-broker`'s `cluster.rs`; see `docs/cluster.md`).

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub mod config;
pub mod network;
mod node;
pub mod proposer;
pub mod router;
pub mod routes;
pub mod session;
pub mod state;
pub mod store;
pub mod wire;

/// The Raft engine, for its request, metrics and membership types.
pub use openraft;

pub use node::{ClusterNode, NodeError, NodeOptions};
pub use proposer::{Proposer, Settled};
pub use router::{ForwardLimits, Incoming, Router, RouterStats};
pub use state::{ClusterState, Command, Effect, NodeId, Outcome, PersistentMatch, Rejection};
pub use store::ApplyHook;
pub use wire::{ForwardedMessage, MessageProperties};

/// A cluster member as Raft's membership records it: where to reach it and the name its
/// certificate must carry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's name (a DNS name in its certificate).
    pub name: String,
    /// The node's cluster listener, `host:port`.
    pub addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

openraft::declare_raft_types!(
    /// openraft's types for the cluster state.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of a node.
pub type Raft = openraft::Raft<TypeConfig>;
