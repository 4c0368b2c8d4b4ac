//! The broker's cluster node: what `[cluster]` starts (see `docs/cluster.md`).
//!
//! [`BrokerCluster`] owns a [`ClusterNode`] (Raft over QUIC, its store in `cluster/` beside the
//! broker's store unless `data_dir` says otherwise) and one task, a child of the broker's
//! shutdown, that does in the background what a node does for itself, so that nothing here
//! holds up the serving of clients:
//!
//! - **bootstrap**, until the node is a voter: it asks every seed to add it (a join request
//!   over the cluster link; a follower names the leader, which is asked in turn). The node
//!   with the lowest id among the configured members (itself and its seeds) initializes a new
//!   cluster of all of them, but only once every seed has answered that it belongs to no
//!   cluster yet, and only if its own store holds no membership: see `may_initialize`.
//! - **announce**: proposes `NodeUp` with the node's new incarnation (bumped in its store at
//!   every start), again until it is committed.
//! - **expiry**: while this node leads, proposes `ExpireSessions` with its clock once a
//!   session's expiry has passed (checked every second; see `expiry_due`).
//! - **metrics**: follows Raft's metrics into the `mqttd_cluster_*` gauges.
//!
//! Routes and forwarding between nodes hang off the same handle: the broker attaches
//! `forwarding.rs` to the node's router at start.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mqttd_cluster::config::{ClusterConfig, Minority};
use mqttd_cluster::openraft::ServerState;
use mqttd_cluster::{ClusterNode, Command, Member, NodeError, NodeId, NodeOptions, Outcome};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::broker::Inner;
use crate::metrics::ClusterMetrics;
use mqttd_proto::ReasonCode;

/// How long bootstrap and announce wait between attempts.
const RETRY: Duration = Duration::from_secs(1);

/// How often the leader looks for sessions to expire.
const EXPIRY_CHECK: Duration = Duration::from_secs(1);

/// How long the leader goes without an answer from a node (heartbeats come every few hundred
/// milliseconds) before it takes that node's connections as lost and orphans its sessions,
/// unless `[cluster] node_down_after` says: longer than an election, so that a node briefly
/// slow or cut off keeps its clients.
const NODE_DOWN_AFTER: Duration = Duration::from_secs(10);

/// The broker's cluster node, shared by whatever broker code needs the cluster.
pub struct BrokerCluster {
    node: ClusterNode,
    config: ClusterConfig,
}

/// Checks a `[cluster]` section and the files it names, binding nothing: the rules across
/// keys, then the CA, certificate and key.
pub(crate) fn check(config: &ClusterConfig, broker_data_dir: &Path) -> Result<(), String> {
    config.check().map_err(|e| e.to_string())?;
    NodeOptions::from_config(config, broker_data_dir)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// How often a node cut off from a quorum, with `minority = "refuse"`, disconnects the
/// clients it has (one that connected as the quorum was lost included).
const REFUSE_EVERY: Duration = Duration::from_secs(1);

/// With `minority = "refuse"`: while this node is cut off from a quorum, its clients are
/// disconnected with 0x9C (use another server), so that they go to the majority side; a
/// CONNECT is refused meanwhile ([`BrokerCluster::refuses_clients`]).
pub(crate) fn refuse_in_minority(inner: &Arc<Inner>, cluster: &BrokerCluster) {
    if cluster.config.minority != Minority::Refuse {
        return;
    }
    let mut quorum = cluster.node.quorum();
    let inner_ref = Arc::downgrade(inner);
    let shutdown = inner.shutdown.clone();
    inner.tasks.spawn(async move {
        // Not in a quorum at start either: nobody is connected, CONNECTs are refused.
        let mut had = false;
        loop {
            let now = *quorum.borrow_and_update();
            if !now {
                let Some(inner) = inner_ref.upgrade() else {
                    return;
                };
                let count = inner.disconnect_all(ReasonCode::UseAnotherServer);
                if had || count > 0 {
                    tracing::warn!(
                        count,
                        "cut off from the cluster's quorum: clients disconnected, CONNECTs refused"
                    );
                }
            } else if !had {
                tracing::info!("on a quorum's side: serving clients");
            }
            had = now;
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = quorum.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(REFUSE_EVERY), if !now => {}
            }
        }
    });
}

/// Starts the node (its store opened, its listener bound) and its background task, which
/// stops the node when `shutdown` is cancelled.
pub(crate) async fn start(
    config: &ClusterConfig,
    broker_data_dir: &Path,
    metrics: ClusterMetrics,
    shutdown: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> Result<Arc<BrokerCluster>, NodeError> {
    config
        .check()
        .map_err(|e| NodeError::Raft(format!("configuration: {e}")))?;
    let options = NodeOptions::from_config(config, broker_data_dir)?;
    let node = ClusterNode::start(options).await?;
    tracing::info!(
        node_id = node.id(),
        name = %node.member().name,
        addr = %node.member().addr,
        incarnation = node.incarnation(),
        "cluster node started"
    );
    let cluster = Arc::new(BrokerCluster {
        node,
        config: config.clone(),
    });
    tasks.spawn(cluster.clone().run(shutdown, metrics));
    Ok(cluster)
}

impl BrokerCluster {
    /// The cluster node: Raft, the replicated state, proposals, the links to peers.
    pub fn node(&self) -> &ClusterNode {
        &self.node
    }

    /// The `[cluster]` section the node runs with.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Whether this node serves no client now: `minority = "refuse"` and it is cut off from
    /// a quorum.
    pub(crate) fn refuses_clients(&self) -> bool {
        self.config.minority == Minority::Refuse && !self.node.in_quorum()
    }

    /// The configured seeds as Raft members.
    fn seeds(&self) -> Vec<(NodeId, Member)> {
        self.config
            .seeds
            .iter()
            .map(|s| (s.id, s.member()))
            .collect()
    }

    /// The background work, until `shutdown`; then the node stops.
    async fn run(self: Arc<Self>, shutdown: CancellationToken, metrics: ClusterMetrics) {
        let work = async {
            tokio::join!(
                self.bootstrap(),
                self.announce(),
                self.expire(),
                self.watch_nodes(),
                self.follow_metrics(&metrics),
                self.follow_quorum(&metrics),
            );
        };
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {}
            () = work => {}
        }
        self.node.stop().await;
    }

    /// Makes this node a member: through the seeds, or by initializing a new cluster.
    async fn bootstrap(self: &Arc<Self>) {
        let seeds = self.seeds();
        let me = self.node.id();
        loop {
            // A voter, not merely a learner: a join whose promotion failed (membership changes
            // asked at once through several seeds) is asked again, and the leader promotes.
            if self.node.voters().contains(&me) {
                return;
            }
            // Every seed at once: one that is not up yet costs a handshake timeout.
            let mut asks = JoinSet::new();
            for seed in seeds.iter().cloned() {
                let cluster = self.clone();
                asks.spawn(async move { cluster.node.join(seed).await });
            }
            let mut answers = Vec::with_capacity(seeds.len());
            while let Some(answer) = asks.join_next().await {
                match answer {
                    Ok(answer) => answers.push(answer),
                    Err(e) => answers.push(Err(NodeError::Raft(e.to_string()))),
                }
            }
            if answers.iter().any(Result::is_ok) {
                tracing::info!(node_id = me, "joined the cluster");
                return;
            }
            let no_cluster = answers
                .iter()
                .filter(|a| matches!(a, Err(NodeError::NoCluster)))
                .count();
            if may_initialize(
                me,
                seeds.iter().map(|(id, _)| *id),
                self.node.is_initialized(),
                no_cluster,
            ) {
                let members: BTreeMap<NodeId, Member> =
                    std::iter::once((me, self.node.member().clone()))
                        .chain(seeds.iter().cloned())
                        .collect();
                match self.node.initialize(members).await {
                    Ok(()) => {
                        tracing::info!(
                            node_id = me,
                            "initialized a new cluster of the configured members"
                        );
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot initialize the cluster"),
                }
            } else if let Some(Err(e)) = answers
                .iter()
                .find(|a| !matches!(a, Err(NodeError::NoCluster)))
            {
                tracing::debug!(error = %e, "not a member yet; asking the seeds again");
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Proposes `NodeUp` with this life's incarnation until it is committed.
    async fn announce(&self) {
        let incarnation = self.node.incarnation();
        let command = Command::NodeUp {
            now_ms: unix_ms(SystemTime::now()),
            node: self.node.id(),
            name: self.node.member().name.clone(),
            incarnation,
        };
        loop {
            if self.node.leader().is_some() {
                match self.node.propose(command.clone()).await {
                    Ok(Outcome::Done) => {
                        tracing::info!(incarnation, "cluster knows this node is up");
                        return;
                    }
                    // An earlier attempt was committed, though its answer was lost.
                    Ok(Outcome::Rejected(mqttd_cluster::Rejection::StaleIncarnation {
                        current,
                        ..
                    })) if current == incarnation => return,
                    Ok(other) => {
                        tracing::warn!(?other, incarnation, "NodeUp refused");
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, "NodeUp not committed yet; retrying"),
                }
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// While this node leads, proposes `ExpireSessions` once a session's expiry has passed.
    async fn expire(&self) {
        let mut tick = tokio::time::interval(EXPIRY_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let leading = self.node.leader() == Some(self.node.id());
            let now_ms = unix_ms(SystemTime::now());
            let earliest = self.node.state().read(|s| s.earliest_expiry());
            if !expiry_due(leading, earliest, now_ms) {
                continue;
            }
            match self.node.propose(Command::ExpireSessions { now_ms }).await {
                Ok(Outcome::Expired { count }) => tracing::debug!(count, "sessions expired"),
                Ok(other) => tracing::debug!(?other, "ExpireSessions"),
                Err(e) => tracing::debug!(error = %e, "ExpireSessions not committed"),
            }
        }
    }

    /// While this node leads: orphans the sessions of a node it has not heard from for
    /// [`NODE_DOWN_AFTER`] or as configured (`NodeDown`: their expiry starts, their wills become due), and
    /// has this node publish the wills that are due (`PublishWills`).
    async fn watch_nodes(&self) {
        let mut tick = tokio::time::interval(EXPIRY_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let me = self.node.id();
        let down_after = self
            .config
            .node_down_after
            .map_or(NODE_DOWN_AFTER, Duration::from_secs);
        let mut leading_since = None;
        // Silent nodes already dealt with (orphaned, or found serving nothing), with their
        // incarnation and when they were last heard: not looked at again (a scan of every
        // session) until they are heard from or start again.
        let mut settled: HashMap<NodeId, (u64, Option<tokio::time::Instant>)> = HashMap::new();
        loop {
            tick.tick().await;
            if self.node.leader() != Some(me) {
                leading_since = None;
                settled.clear();
                continue;
            }
            let now = tokio::time::Instant::now();
            // A new leader has heard nobody yet: it gives everyone the same time.
            let since = *leading_since.get_or_insert(now);
            let others: Vec<(NodeId, u64)> = self.node.state().read(|s| {
                s.nodes()
                    .iter()
                    .filter(|(id, _)| **id != me)
                    .map(|(id, r)| (*id, r.incarnation))
                    .collect()
            });
            for (node, incarnation) in others {
                let last = self.node.last_heard(node);
                let heard = last.map_or(since, |h| h.max(since));
                if now.saturating_duration_since(heard) < down_after
                    || settled.get(&node) == Some(&(incarnation, last))
                {
                    continue;
                }
                if !self
                    .node
                    .state()
                    .read(|s| s.serves_sessions(node, incarnation))
                {
                    settled.insert(node, (incarnation, last));
                    continue;
                }
                tracing::warn!(
                    node,
                    incarnation,
                    "no answer from the node: its sessions are orphaned"
                );
                let down = Command::NodeDown {
                    node,
                    incarnation,
                    now_ms: unix_ms(SystemTime::now()),
                };
                match self.node.propose(down).await {
                    Ok(outcome) => {
                        tracing::debug!(node, ?outcome, "NodeDown");
                        settled.insert(node, (incarnation, last));
                    }
                    Err(e) => tracing::debug!(node, error = %e, "NodeDown not committed"),
                }
            }
            let now_ms = unix_ms(SystemTime::now());
            if self
                .node
                .state()
                .read(|s| s.earliest_will())
                .is_some_and(|due| due <= now_ms)
            {
                let publish = Command::PublishWills { by: me, now_ms };
                match self.node.propose(publish).await {
                    Ok(outcome) => tracing::debug!(?outcome, "PublishWills"),
                    Err(e) => tracing::debug!(error = %e, "PublishWills not committed"),
                }
            }
        }
    }

    /// Sets the `mqttd_cluster_*` gauges at each change of Raft's metrics.
    async fn follow_metrics(&self, gauges: &ClusterMetrics) {
        let mut metrics = self.node.raft().metrics();
        let mut leader = None;
        loop {
            {
                let m = metrics.borrow_and_update();
                let membership = m.membership_config.membership();
                let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
                gauges.members.set(count(membership.nodes().count()));
                gauges.voters.set(count(membership.voter_ids().count()));
                gauges
                    .is_leader
                    .set(i64::from(m.current_leader == Some(m.id)));
                gauges.has_leader.set(i64::from(m.current_leader.is_some()));
                let index = |i: Option<u64>| i64::try_from(i.unwrap_or(0)).unwrap_or(i64::MAX);
                gauges.term.set(index(Some(m.current_term)));
                gauges.last_log_index.set(index(m.last_log_index));
                let applied = m.last_applied.map(|l| l.index);
                gauges.last_applied.set(index(applied));
                gauges.apply_lag.set(index(
                    m.last_log_index
                        .map(|l| l.saturating_sub(applied.unwrap_or(0))),
                ));
                if m.current_leader != leader {
                    if leader.is_some() || m.current_leader.is_some() {
                        gauges.leader_changes.inc();
                    }
                    leader = m.current_leader;
                }
                gauges.replication_lag.clear();
                if let Some(replication) = &m.replication {
                    let last = m.last_log_index.unwrap_or(0);
                    for (node, matched) in replication {
                        let behind = last.saturating_sub(matched.map_or(0, |l| l.index));
                        gauges
                            .replication_lag
                            .get_or_create(&[("node", node.to_string())])
                            .set(index(Some(behind)));
                    }
                }
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    }

    /// Sets `mqttd_cluster_in_quorum` at each change of [`ClusterNode::in_quorum`].
    async fn follow_quorum(&self, gauges: &ClusterMetrics) {
        let mut quorum = self.node.quorum();
        loop {
            gauges.in_quorum.set(i64::from(*quorum.borrow_and_update()));
            if quorum.changed().await.is_err() {
                return;
            }
        }
    }

    /// This node's view of the cluster, for the admin API.
    pub fn status(&self) -> ClusterStatus {
        // The state first: no other lock is taken while the metrics are borrowed.
        let (incarnations, sessions, wills_due) = self.node.state().read(|s| {
            let incarnations = s
                .nodes()
                .iter()
                .map(|(id, r)| (*id, r.incarnation))
                .collect::<BTreeMap<_, _>>();
            (incarnations, s.session_count(), s.due_wills().len())
        });
        let routes = self.node.router().stats();
        let metrics = self.node.raft().metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let members = membership
            .nodes()
            .map(|(id, member)| MemberStatus {
                node_id: *id,
                name: member.name.clone(),
                addr: member.addr.clone(),
                role: match membership.voter_ids().any(|v| v == *id) {
                    true => "voter".into(),
                    false => "learner".into(),
                },
                incarnation: incarnations.get(id).copied(),
                matched: m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id))
                    .and_then(|l| l.map(|l| l.index)),
                routes: routes.nodes.get(id).map(|n| RoutesStatus {
                    count: n.routes,
                    digest: format!("{:x}:{:016x}", n.digest.count, n.digest.sum),
                    link_up: (*id != self.node.id()).then_some(n.link_up),
                    forwarded: n.forwarded,
                    dropped: n.dropped,
                    queued: n.queued,
                }),
            })
            .collect();
        let state = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        ClusterStatus {
            node_id: self.node.id(),
            name: self.node.member().name.clone(),
            addr: self.node.member().addr.clone(),
            incarnation: self.node.incarnation(),
            state: state.into(),
            leader: m.current_leader,
            in_quorum: self.node.in_quorum(),
            term: m.current_term,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            members,
            forwarded_out: routes.forwarded_out,
            forwarded_in: routes.forwarded_in,
            forward_dropped: routes.dropped,
            sessions,
            wills_due,
        }
    }

    /// Asks the cluster to add this node, through `seed` or else through each configured seed
    /// in turn, and waits until the leader made it a voter.
    pub async fn join(&self, seed: Option<(NodeId, Member)>) -> Result<(), NodeError> {
        let seeds = match seed {
            Some(seed) => vec![seed],
            None => self.seeds(),
        };
        let mut last = NodeError::Raft("no seed to ask: give one, or configure seeds".into());
        for seed in seeds {
            match self.node.join(seed).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Removes `id` (default: this node) from the cluster through the leader, then tells the
    /// cluster state that the node is gone (best effort: the membership is what counts).
    pub async fn leave(&self, id: Option<NodeId>) -> Result<(), NodeError> {
        let id = id.unwrap_or(self.node.id());
        self.node.leave(id).await?;
        if let Err(e) = self
            .node
            .propose(Command::NodeRemoved {
                node: id,
                now_ms: unix_ms(SystemTime::now()),
            })
            .await
        {
            tracing::debug!(error = %e, node = id, "NodeRemoved not committed");
        }
        Ok(())
    }
}

/// The bootstrap rule: a node initializes a new cluster only if it has the lowest id among
/// the configured members, belongs to no cluster itself, and every seed answered that it
/// belongs to none either. Among nodes configured with the same members exactly one may
/// initialize, and it does not once any seed has a cluster: a node restarted with an empty
/// store joins the cluster its seeds have instead of making a second one.
pub(crate) fn may_initialize(
    me: NodeId,
    seeds: impl IntoIterator<Item = NodeId>,
    initialized: bool,
    no_cluster_answers: usize,
) -> bool {
    let mut count = 0;
    let mut lowest = true;
    for seed in seeds {
        count += 1;
        lowest &= seed > me;
    }
    !initialized && lowest && no_cluster_answers == count
}

/// Whether the leader should propose `ExpireSessions` now: it leads, and the earliest expiry
/// has passed (a log entry only when a session is due, not every tick).
pub(crate) fn expiry_due(leading: bool, earliest_ms: Option<u64>, now_ms: u64) -> bool {
    leading && earliest_ms.is_some_and(|at| at <= now_ms)
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A node's view of the cluster (`GET /api/v1/cluster`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct ClusterStatus {
    /// This node's Raft id.
    pub node_id: u64,
    /// Its name (the DNS name in its certificate).
    pub name: String,
    /// The address peers dial.
    pub addr: String,
    /// This life of the node (bumped at every start).
    pub incarnation: u64,
    /// Its Raft state: `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub state: String,
    /// The leader it knows, if any.
    pub leader: Option<u64>,
    /// Whether its leader (itself, or the one it knows) confirmed within the election timeout
    /// that a majority of the voters follows it: false on a minority's side of a partition,
    /// where persistent sessions are refused.
    pub in_quorum: bool,
    /// Its Raft term.
    pub term: u64,
    /// The index of the last entry of its log.
    pub last_log_index: Option<u64>,
    /// The index of the last entry it applied.
    pub last_applied: Option<u64>,
    /// The members of the cluster as it knows them.
    pub members: Vec<MemberStatus>,
    /// Messages this node forwarded to other nodes, since it started.
    pub forwarded_out: u64,
    /// Messages other nodes forwarded here, since it started.
    pub forwarded_in: u64,
    /// Messages for other nodes this node dropped (a full queue, a link down).
    pub forward_dropped: u64,
    /// Persistent sessions in the cluster, as this node's copy of the state holds them.
    pub sessions: usize,
    /// Wills of connections gone with their node, waiting for their delay.
    pub wills_due: usize,
}

/// One member of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct MemberStatus {
    /// Its Raft id.
    pub node_id: u64,
    /// Its name.
    pub name: String,
    /// Its cluster address.
    pub addr: String,
    /// `voter` or `learner`.
    pub role: String,
    /// Its incarnation as the cluster state records it (from its last `NodeUp`).
    pub incarnation: Option<u64>,
    /// On the leader: the index of the last entry it acknowledged.
    pub matched: Option<u64>,
    /// Its routes as this node holds them (clean sessions' subscriptions), if known.
    pub routes: Option<RoutesStatus>,
}

/// A member's routes as one node holds them, and that node's forwarding to it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct RoutesStatus {
    /// How many routes.
    pub count: usize,
    /// Their digest (`count:sum`, hex): equal on every node that agrees on the member's routes.
    pub digest: String,
    /// Whether this node's forwarding link to the member is up (absent for this node itself).
    pub link_up: Option<bool>,
    /// Messages this node forwarded to it.
    pub forwarded: u64,
    /// Messages for it this node dropped.
    pub dropped: u64,
    /// Messages queued for it now.
    pub queued: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_lowest_uninitialized_node_initializes_and_only_when_no_seed_has_a_cluster() {
        // The lowest of 1, 2, 3, when both seeds answered "no cluster".
        assert!(may_initialize(1, [2, 3], false, 2));
        // Not the lowest.
        assert!(!may_initialize(2, [1, 3], false, 2));
        assert!(!may_initialize(4, [1, 2, 3], false, 3));
        // A seed did not answer, or has a cluster.
        assert!(!may_initialize(1, [2, 3], false, 1));
        // Its own store holds a membership.
        assert!(!may_initialize(1, [2, 3], true, 2));
        // Alone: a cluster of one.
        assert!(may_initialize(5, [], false, 0));
    }

    /// A CA and a certificate for `name`, written into `dir`; the `[cluster]` section of a
    /// node alone (no seeds) on a port the system picks.
    fn section_alone(dir: &Path, name: &str) -> ClusterConfig {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("node.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("node.key"), key.serialize_pem()).unwrap();
        let text = format!(
            "[cluster]\nnode_id = 7\nname = {name:?}\nlisten = \"127.0.0.1:0\"\n\
             ca = {:?}\ncert = {:?}\nkey = {:?}\n",
            dir.join("ca.pem"),
            dir.join("node.pem"),
            dir.join("node.key")
        );
        ClusterConfig::parse(&text).unwrap()
    }

    /// Polls `check` every 50 ms, for at most 60 s.
    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !check() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_alone_forms_a_cluster_announces_itself_and_expires_sessions_as_leader() {
        let dir = tempfile::tempdir().unwrap();
        let config = section_alone(dir.path(), "solo");
        let metrics = crate::Metrics::default();
        let shutdown = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let cluster = start(
            &config,
            dir.path(),
            metrics.cluster(),
            shutdown.clone(),
            &tasks,
        )
        .await
        .unwrap();
        let node = cluster.node();
        eventually("a cluster of one, leading", || node.leader() == Some(7)).await;
        eventually("its NodeUp applied", || {
            node.state()
                .read(|s| s.nodes().get(&7).map(|r| r.incarnation))
                == Some(node.incarnation())
        })
        .await;
        let status = cluster.status();
        assert_eq!(status.state, "leader");
        assert_eq!(status.members.len(), 1);
        assert_eq!(status.members[0].incarnation, Some(node.incarnation()));
        eventually("the gauges", || {
            metrics.render().contains("mqttd_cluster_is_leader 1")
        })
        .await;
        // A leader of one is its own majority; the quorum watch runs with the default
        // `minority = "serve"` too.
        eventually("the quorum confirmed", || {
            cluster.status().in_quorum && metrics.render().contains("mqttd_cluster_in_quorum 1")
        })
        .await;

        // A session already expired, and one that never expires: only the first goes.
        let past = unix_ms(SystemTime::now()) - 1;
        for (client_id, expires_at_ms) in [("gone", Some(past)), ("kept", None)] {
            let claimed = node
                .propose(Command::ClaimSession {
                    owner_quiet_ms: 0,
                    not_after_ms: 0,
                    incarnation: 0,
                    client_id: client_id.into(),
                    node: 7,
                    expires_at_ms,
                    clean: false,
                })
                .await
                .unwrap();
            assert!(matches!(claimed, Outcome::Claimed { .. }), "{claimed:?}");
        }
        eventually("the leader expiring the due session", || {
            node.state()
                .read(|s| s.session("gone").is_none() && s.session("kept").is_some())
        })
        .await;

        shutdown.cancel();
        tasks.close();
        tokio::time::timeout(Duration::from_secs(30), tasks.wait())
            .await
            .expect("the node stops with the broker");
    }

    #[test]
    fn expiry_is_proposed_by_the_leader_once_a_session_is_due() {
        assert!(expiry_due(true, Some(1_000), 1_000));
        assert!(expiry_due(true, Some(999), 1_000));
        assert!(!expiry_due(true, Some(1_001), 1_000));
        assert!(!expiry_due(true, None, 1_000));
        assert!(!expiry_due(false, Some(1), 1_000));
    }
}
