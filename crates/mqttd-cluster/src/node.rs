//! A cluster node: the store, Raft, and the QUIC listener that answers peers.
//!
//! [`ClusterNode::start`] opens the store (the state is back from disk before Raft runs),
//! binds the endpoint and starts Raft and the accept loop; [`ClusterNode::shutdown`] stops
//! Raft, then the accept loop and every stream it spawned, then closes the endpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use openraft::ChangeMembers;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ClusterConfig;
use crate::network::{
    self, Forwarded, MembershipRefused, MembershipRequest, Network, Peer, Tls, TlsError,
    MEMBERSHIP_TIMEOUT,
};
use crate::router::{ForwardLimits, Router};
use crate::state::{Command, NodeId, Outcome};
use crate::store::{self, OpenError, StateReader};
use crate::{Member, Raft};

/// How long a node shutting down waits for its peers to hear of it.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How long a proposal forwarded to the leader may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a forwarded proposal looks for a new life of the leader it went to.
const RESTART_POLL: Duration = Duration::from_millis(100);

/// What a node needs to start.
#[non_exhaustive]
pub struct NodeOptions {
    /// Its Raft id.
    pub id: NodeId,
    /// Its name and the address peers dial (its `addr` may name port 0 until bound; see
    /// [`ClusterNode::member`]).
    pub member: Member,
    /// Where the QUIC endpoint binds.
    pub listen: SocketAddr,
    /// The store's directory.
    pub data_dir: PathBuf,
    /// Its certificates.
    pub tls: Tls,
    /// Raft's timing and snapshot policy.
    pub raft: openraft::Config,
    /// The bounds of message forwarding to and from peers.
    pub forward: ForwardLimits,
}

impl NodeOptions {
    /// Options with openraft's timing made for real networks and busy machines: heartbeats
    /// every 250 ms, elections after 1.5-3 s of silence.
    pub fn new(id: NodeId, name: &str, listen: SocketAddr, data_dir: PathBuf, tls: Tls) -> Self {
        let raft = openraft::Config {
            cluster_name: "mqttd".into(),
            heartbeat_interval: 250,
            election_timeout_min: 1500,
            election_timeout_max: 3000,
            ..Default::default()
        };
        Self {
            id,
            member: Member {
                name: name.to_owned(),
                addr: listen.to_string(),
            },
            listen,
            data_dir,
            tls,
            raft,
            forward: ForwardLimits::default(),
        }
    }

    /// Options from the `[cluster]` section; `broker_data_dir` is the broker's store.
    pub fn from_config(
        config: &ClusterConfig,
        broker_data_dir: &std::path::Path,
    ) -> Result<Self, NodeError> {
        let tls = Tls::load(&config.ca, &config.cert, &config.key)?;
        let mut options = Self::new(
            config.node_id,
            &config.name,
            config.listen,
            config.data_dir(broker_data_dir),
            tls,
        );
        options.member = config.member();
        if let Some(every) = config.snapshot_every {
            options.raft.snapshot_policy = openraft::SnapshotPolicy::LogsSinceLast(every);
        }
        if let Some(kept) = config.log_kept {
            options.raft.max_in_snapshot_log_to_keep = kept;
        }
        Ok(options)
    }
}

/// Why a node cannot start or a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The store cannot be opened.
    #[error(transparent)]
    Store(#[from] OpenError),
    /// The certificates are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The endpoint cannot bind.
    #[error("cannot bind the cluster listener on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The system's error.
        source: std::io::Error,
    },
    /// openraft refused the configuration.
    #[error("Raft configuration: {0}")]
    Config(Box<openraft::ConfigError>),
    /// This node is not the leader; `leader` is, if known.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader, if this node knows one.
        leader: Option<(NodeId, Member)>,
    },
    /// A proposal forwarded to the leader failed on the way; it may have been committed.
    #[error("forwarding to the leader: {0}")]
    Forward(String),
    /// Raft failed (it stopped, or a membership change was refused).
    #[error("Raft: {0}")]
    Raft(String),
    /// The peer asked belongs to no cluster yet.
    #[error("the peer belongs to no cluster yet")]
    NoCluster,
}

impl From<MembershipRefused> for NodeError {
    fn from(refused: MembershipRefused) -> Self {
        match refused {
            MembershipRefused::NoCluster => Self::NoCluster,
            MembershipRefused::NotLeader(leader) => Self::NotLeader { leader },
            MembershipRefused::Failed(e) => Self::Forward(e),
        }
    }
}

/// Makes a membership change on this node, which must lead: what a peer's
/// [`MembershipRequest`] asks. Joining a voter and removing a non-member change nothing.
pub(crate) async fn change_membership_here(
    raft: &Raft,
    req: MembershipRequest,
) -> Result<(), MembershipRefused> {
    let refused = |e: NodeError| match e {
        NodeError::NotLeader { leader } => MembershipRefused::NotLeader(leader),
        e => MembershipRefused::Failed(e.to_string()),
    };
    let (initialized, leading, voter, learner, leader) = {
        let metrics = raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let id = match &req {
            MembershipRequest::Join { id, .. } | MembershipRequest::Leave { id } => *id,
        };
        let leader = metrics.current_leader.and_then(|l| {
            membership
                .get_node(&l)
                .map(|m| (l, m.clone()))
                .filter(|_| l != metrics.id)
        });
        let facts = (
            membership.nodes().next().is_some(),
            metrics.current_leader == Some(metrics.id),
            membership.voter_ids().any(|v| v == id),
            membership.learner_ids().any(|v| v == id),
            leader,
        );
        facts
    };
    if !initialized {
        return Err(MembershipRefused::NoCluster);
    }
    // A follower names the leader; the asker goes there (as a forwarded proposal does).
    if !leading {
        return Err(MembershipRefused::NotLeader(leader));
    }
    match req {
        MembershipRequest::Join { .. } if voter => Ok(()),
        MembershipRequest::Join { id, .. } if learner => raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map(drop)
            .map_err(|e| refused(membership_error(e))),
        MembershipRequest::Join { id, member } => {
            add_member(raft, id, member).await.map_err(refused)
        }
        MembershipRequest::Leave { id } if voter => raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
            .map(drop)
            .map_err(|e| refused(membership_error(e))),
        MembershipRequest::Leave { id } if learner => raft
            .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
            .await
            .map(drop)
            .map_err(|e| refused(membership_error(e))),
        MembershipRequest::Leave { .. } => Ok(()),
    }
}

/// Adds `id` as a learner, caught up, then as a voter.
async fn add_member(raft: &Raft, id: NodeId, member: Member) -> Result<(), NodeError> {
    raft.add_learner(id, member, true)
        .await
        .map_err(membership_error)?;
    raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
        .await
        .map_err(membership_error)?;
    Ok(())
}

fn membership_error(
    e: RaftError<NodeId, openraft::error::ClientWriteError<NodeId, Member>>,
) -> NodeError {
    match e {
        RaftError::APIError(openraft::error::ClientWriteError::ForwardToLeader(f)) => {
            NodeError::NotLeader {
                leader: f.leader_id.zip(f.leader_node),
            }
        }
        e => NodeError::Raft(e.to_string()),
    }
}

/// A running cluster node.
pub struct ClusterNode {
    id: NodeId,
    incarnation: u64,
    member: Member,
    raft: Raft,
    state: StateReader,
    endpoint: noq::Endpoint,
    network: Network,
    /// What this node adds to the claims it proposes as leader.
    stamp: network::Stamp,
    /// The link to the leader that proposals are forwarded on, with the leader's
    /// incarnation when it was dialled.
    leader_link: tokio::sync::Mutex<Option<(NodeId, Option<u64>, Peer)>>,
    /// Routes and forwarding to peers.
    router: Router,
    /// Whether this node is on a quorum's side ([`ClusterNode::in_quorum`]).
    quorum: tokio::sync::watch::Receiver<bool>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl ClusterNode {
    /// Opens the store, binds the endpoint and starts Raft.
    pub async fn start(options: NodeOptions) -> Result<Self, NodeError> {
        let (log, sm) = store::open(&options.data_dir)?;
        let incarnation = log.incarnation();
        let state = sm.reader();
        let (endpoint, forward_client) =
            network::bind(&options.tls, options.listen).map_err(|source| NodeError::Bind {
                addr: options.listen,
                source,
            })?;
        let mut member = options.member;
        if let Ok(local) = endpoint.local_addr() {
            // A listener on port 0 advertises the port it got.
            if member.addr == options.listen.to_string() {
                member.addr = local.to_string();
            }
        }
        let config = Arc::new(
            options
                .raft
                .validate()
                .map_err(|e| NodeError::Config(Box::new(e)))?,
        );
        let network = Network::new(endpoint.clone());
        let stamp = network.stamp(state.clone(), config.election_timeout_min);
        let quorum_stale = Duration::from_millis(config.election_timeout_max);
        let raft = Raft::new(options.id, config, network.clone(), log, sm)
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let router = Router::new(
            options.id,
            incarnation,
            endpoint.clone(),
            forward_client,
            raft.clone(),
            stop.clone(),
            tasks.clone(),
            options.forward,
        );
        tasks.spawn(follow_leadership(raft.clone(), stamp.clone(), stop.clone()));
        let confirmations = network::Confirmations::default();
        let (in_quorum, quorum) = tokio::sync::watch::channel(false);
        tasks.spawn(watch_quorum(
            raft.clone(),
            network.clone(),
            confirmations.clone(),
            in_quorum,
            quorum_stale,
            stop.clone(),
        ));
        tasks.spawn(network::serve(
            endpoint.clone(),
            raft.clone(),
            stamp.clone(),
            confirmations,
            router.clone(),
            stop.clone(),
            tasks.clone(),
        ));
        Ok(Self {
            id: options.id,
            incarnation,
            member,
            raft,
            state,
            endpoint,
            network,
            stamp,
            leader_link: tokio::sync::Mutex::new(None),
            router,
            quorum,
            stop,
            tasks,
        })
    }

    /// Sets the hook told what each entry this node applies changes for the sessions.
    pub fn on_apply(&self, hook: Arc<dyn store::ApplyHook>) {
        self.state.set_hook(hook);
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// This life of the node: bumped in its store at every start, for `Command::NodeUp` and
    /// for tagging what it streams to peers.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// This node as peers reach it.
    pub fn member(&self) -> &Member {
        &self.member
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// When `node` last answered this node's `AppendEntries` (heartbeats included): while
    /// this node leads, how recently each follower was alive.
    pub fn last_heard(&self, node: NodeId) -> Option<tokio::time::Instant> {
        self.network.last_heard(node)
    }

    /// The Raft handle (metrics, membership changes).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Routes and message forwarding: the broker announces its local subscriptions here,
    /// forwards messages for subscribers on other nodes and takes those forwarded to it.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The state as applied on this node.
    pub fn state(&self) -> &StateReader {
        &self.state
    }

    /// Whether this node is on a quorum's side: its leader (itself, or the one it knows) had
    /// a majority of the voters acknowledge it within the last `election_timeout_max`, give
    /// or take 1 s (this node looks every `QUORUM_EVERY`, 0.5 s, and the leader answers from
    /// a round up to as old). False until that is first seen.
    pub fn in_quorum(&self) -> bool {
        *self.quorum.borrow()
    }

    /// [`ClusterNode::in_quorum`], watched.
    pub fn quorum(&self) -> tokio::sync::watch::Receiver<bool> {
        self.quorum.clone()
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Makes a new cluster of `members` (this node among them). Done once, on one node, when
    /// the cluster is first set up; a cluster already initialized refuses it.
    pub async fn initialize(&self, members: BTreeMap<NodeId, Member>) -> Result<(), NodeError> {
        self.raft.initialize(members).await.map_err(
            |e: RaftError<NodeId, InitializeError<NodeId, Member>>| NodeError::Raft(e.to_string()),
        )
    }

    /// Adds `id` as a voter: first as a learner, caught up with the log (blocking until it
    /// is), then promoted. Only on the leader.
    pub async fn add_member(&self, id: NodeId, member: Member) -> Result<(), NodeError> {
        add_member(&self.raft, id, member).await
    }

    /// Removes `id` from the cluster: it no longer votes nor receives the log. Only on the
    /// leader.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), NodeError> {
        self.raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
            .map_err(membership_error)?;
        Ok(())
    }

    /// The voters of the membership this node knows.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        let metrics = self.raft.metrics();
        let voters = metrics
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        voters
    }

    /// Proposes a command and waits until the leader has committed and applied it: here if
    /// this node leads, else forwarded to the leader it knows (once; if leadership moved
    /// meanwhile, `NotLeader` names the new leader and the caller may try again). The
    /// outcome is the leader's; this node applies the entry when it learns of the commit.
    pub async fn propose(&self, command: Command) -> Result<Outcome, NodeError> {
        let leader = match network::propose_here(&self.raft, &self.stamp, command.clone()).await {
            Ok(outcome) => return Ok(outcome),
            Err(Forwarded::NotLeader(Some(leader))) if leader.0 != self.id => leader,
            Err(Forwarded::NotLeader(leader)) => return Err(NodeError::NotLeader { leader }),
            Err(Forwarded::Failed(e)) => return Err(NodeError::Raft(e)),
        };
        let incarnation_of = {
            let state = self.state.clone();
            let id = leader.0;
            move || state.read(|s| s.nodes().get(&id).map(|n| n.incarnation))
        };
        let incarnation = incarnation_of();
        let link = {
            let mut link = self.leader_link.lock().await;
            let peer = match &mut *link {
                // A leader killed and started again may lead again, under the same term: a
                // connection to its previous life would wait for its idle timeout (10 s).
                Some((id, life, peer)) if *id == leader.0 && *life == incarnation => peer,
                slot => {
                    &mut slot
                        .insert((leader.0, incarnation, self.network.peer(leader.0, leader.1)))
                        .2
                }
            };
            peer.proposal_link().await
        };
        let forwarded = async {
            match link {
                Ok(link) => link.propose(&command, FORWARD_TIMEOUT).await,
                Err(e) => Err(e),
            }
        };
        // A leader that stopped answering (paused, cut off, killed) is not waited for once
        // another one is known: the caller may propose again there.
        let moved = leader_moved(&self.raft, leader.0);
        // Nor is a leader that was started again (a new incarnation applied here), which
        // leads on without an election when it comes back quickly enough.
        let restarted = leader_restarted(RESTART_POLL, incarnation, incarnation_of);
        tokio::select! {
            forwarded = forwarded => match forwarded {
                Ok(outcome) => Ok(outcome),
                Err(Forwarded::NotLeader(leader)) => Err(NodeError::NotLeader { leader }),
                Err(Forwarded::Failed(e)) => Err(NodeError::Forward(e)),
            },
            () = moved => Err(NodeError::Forward(format!(
                "node {} stopped leading while the proposal was on its way",
                leader.0
            ))),
            () = restarted => Err(NodeError::Forward(format!(
                "node {} started again while the proposal was on its way",
                leader.0
            ))),
        }
    }

    /// Whether this node belongs to a cluster: it was initialized, or a leader added it.
    pub fn is_initialized(&self) -> bool {
        let metrics = self.raft.metrics();
        let initialized = metrics
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .next()
            .is_some();
        initialized
    }

    /// Whether this node is in the membership it knows (as a voter or a learner).
    pub fn is_member(&self) -> bool {
        let metrics = self.raft.metrics();
        let member = metrics
            .borrow()
            .membership_config
            .membership()
            .get_node(&self.id)
            .is_some();
        member
    }

    /// Asks `seed` (any node of a cluster) to make this node a member: a follower names the
    /// leader, which is asked in turn; the leader adds this node as a learner, catches it up,
    /// then makes it a voter, and answers once it has. `NoCluster` if the seed belongs to no
    /// cluster yet.
    pub async fn join(&self, seed: (NodeId, Member)) -> Result<(), NodeError> {
        let req = MembershipRequest::Join {
            id: self.id,
            member: self.member.clone(),
        };
        self.ask_membership(seed, &req).await
    }

    /// Removes `id` (this node or another) from the membership, through the leader: here if
    /// this node leads, else on the leader it knows.
    pub async fn leave(&self, id: NodeId) -> Result<(), NodeError> {
        let req = MembershipRequest::Leave { id };
        match change_membership_here(&self.raft, req.clone()).await {
            Ok(()) => Ok(()),
            Err(MembershipRefused::NotLeader(Some(leader))) => {
                self.ask_membership(leader, &req).await
            }
            Err(refused) => Err(refused.into()),
        }
    }

    /// Sends `req` to `to`, then to the leader it names (a few hops at most, as leadership
    /// may move meanwhile).
    async fn ask_membership(
        &self,
        mut to: (NodeId, Member),
        req: &MembershipRequest,
    ) -> Result<(), NodeError> {
        for _ in 0..3 {
            let mut peer = self.network.peer(to.0, to.1.clone());
            match peer.membership(req, MEMBERSHIP_TIMEOUT).await {
                Err(MembershipRefused::NotLeader(Some(leader))) if leader != to => to = leader,
                answer => return answer.map_err(NodeError::from),
            }
        }
        Err(NodeError::NotLeader { leader: Some(to) })
    }

    /// What [`ClusterNode::shutdown`] does, for a node shared behind a reference: stops
    /// Raft, the listener and its streams, and closes the endpoint. The node answers nothing
    /// afterwards.
    pub async fn stop(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "Raft did not stop cleanly");
        }
        self.stop.cancel();
        // Closing the endpoint ends the streams still being answered.
        self.endpoint.close(noq::VarInt::from_u32(0), b"shutdown");
        self.tasks.close();
        self.tasks.wait().await;
        // Lets live peers learn of the close; links to dead peers would wait out their idle
        // timeout, so the wait is bounded.
        let _ = tokio::time::timeout(CLOSE_GRACE, self.endpoint.wait_idle()).await;
    }

    /// Stops Raft, the listener and its streams, and closes the endpoint. The UDP socket is
    /// released once every connection has drained, which for a link to a peer that stopped
    /// answering can take up to the idle timeout (10 s): a node started again in the same
    /// process on the same address may have to retry its bind.
    pub async fn shutdown(self) {
        self.stop().await;
    }
}

/// Resolves once `incarnation()` names a life of the leader other than `from` (a first one
/// learned is not a restart), looking every `every`.
async fn leader_restarted(
    every: Duration,
    from: Option<u64>,
    mut incarnation: impl FnMut() -> Option<u64>,
) {
    loop {
        tokio::time::sleep(every).await;
        if from.is_some() && incarnation().is_some_and(|now| Some(now) != from) {
            return;
        }
    }
}

/// Tells `stamp` when this node comes to lead a term, until `stop`.
async fn follow_leadership(raft: Raft, stamp: network::Stamp, stop: CancellationToken) {
    let mut metrics = raft.metrics();
    loop {
        {
            let m = metrics.borrow_and_update();
            if m.current_leader == Some(m.id) {
                stamp.leads(m.current_term);
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = metrics.changed() => if changed.is_err() { return },
        }
    }
}

/// How often a node looks whether it is on a quorum's side.
pub(crate) const QUORUM_EVERY: Duration = Duration::from_millis(500);

/// Keeps `in_quorum` true while this node has seen, no longer than `stale` ago, its leader
/// confirm a quorum ([`network::Confirmations::leads_a_quorum`]): itself, or the leader it knows, asked over
/// the cluster link. A minority side sees no such confirmation: a leader cut off gets no
/// majority's heartbeat answers, and a follower cut off cannot ask, or asks a leader that
/// gets none.
async fn watch_quorum(
    raft: Raft,
    network: Network,
    confirmations: network::Confirmations,
    in_quorum: tokio::sync::watch::Sender<bool>,
    stale: Duration,
    stop: CancellationToken,
) {
    let mut asked: Option<(NodeId, Peer)> = None;
    let mut confirmed: Option<tokio::time::Instant> = None;
    loop {
        let (me, leader) = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            let leader = m.current_leader.and_then(|l| {
                let member = m.membership_config.membership().get_node(&l).cloned();
                Some(l).zip(member)
            });
            (m.id, leader)
        };
        let started = tokio::time::Instant::now();
        let leads = match leader {
            Some((l, _)) if l == me => {
                confirmations
                    .leads_a_quorum(&raft, network::QUORUM_TTL)
                    .await
            }
            Some((l, member)) => {
                let peer = match &mut asked {
                    Some((id, peer)) if *id == l => peer,
                    slot => &mut slot.insert((l, network.peer(l, member))).1,
                };
                // Its own confirmation may take `QUORUM_TTL`; then the way back.
                let answer = peer.leads_a_quorum(2 * network::QUORUM_TTL).await;
                if answer.is_none() {
                    // Dial again next time: the link may be dead (the leader restarted).
                    asked = None;
                }
                answer.unwrap_or(false)
            }
            None => false,
        };
        if leads {
            confirmed = Some(started);
        }
        let now = confirmed.is_some_and(|at| at.elapsed() <= stale);
        in_quorum.send_if_modified(|held| std::mem::replace(held, now) != now);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(started + QUORUM_EVERY) => {}
        }
    }
}

/// Resolves once this node knows of a leader other than `from`.
async fn leader_moved(raft: &Raft, from: NodeId) {
    let mut metrics = raft.metrics();
    loop {
        if metrics
            .borrow_and_update()
            .current_leader
            .is_some_and(|l| l != from)
        {
            return;
        }
        if metrics.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_forward_gives_up_on_a_new_life_of_its_leader_only() {
        let every = Duration::from_millis(5);
        let life = Arc::new(AtomicU64::new(1));
        let read = {
            let life = life.clone();
            move || Some(life.load(Ordering::SeqCst))
        };
        let watch = tokio::spawn(leader_restarted(every, Some(1), read));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!watch.is_finished(), "the same life is no restart");
        life.store(2, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(5), watch)
            .await
            .expect("a new incarnation is a restart")
            .expect("the watch ran");

        // Not knowing the leader's life at first, learning it is no restart either.
        let unknown = tokio::spawn(leader_restarted(every, None, || Some(1)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!unknown.is_finished());
        unknown.abort();
        // Nor is a life the state does not name (a member forgotten meanwhile).
        let forgotten = tokio::spawn(leader_restarted(every, Some(1), || None));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!forgotten.is_finished());
        forgotten.abort();
    }
}
