//! Raft's RPCs between nodes over QUIC (noq) with mutual TLS.
//!
//! Every node holds a certificate signed by the cluster's CA, with its name as a DNS name. A
//! node accepts a connection only from a peer presenting a certificate from that CA (TLS 1.3
//! client authentication), and dials a peer expecting its name in the peer's certificate. The
//! ALPN is [`ALPN`], distinct from MQTT's, so that a cluster listener never talks MQTT and an
//! MQTT listener never talks Raft.
//!
//! One connection per peer, reused; one bidirectional stream per RPC: the request (a tag byte
//! and the JSON of openraft's request), the sender's FIN, then the answer (the JSON of
//! openraft's result) and the receiver's FIN. Streams are independent, so a slow snapshot chunk
//! never holds up a heartbeat. The same links carry proposals that a follower forwards to the
//! leader, and membership changes (a node joining or leaving) asked of the leader.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    ClientWriteError, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::state::{Command, NodeId, Outcome, Rejection};
use crate::store::StateReader;
use crate::{Member, Raft, TypeConfig};

/// The ALPN of the cluster protocol.
pub const ALPN: &[u8] = b"mqttd-cluster/1";

/// The largest request or answer read (a batch of entries, a snapshot chunk).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The requests a peer may have open at once on its link.
const MAX_STREAMS: u32 = 16;

/// How long dialing a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const TAG_APPEND: u8 = 1;
const TAG_VOTE: u8 = 2;
const TAG_SNAPSHOT: u8 = 3;
const TAG_PROPOSE: u8 = 4;
/// Whether the leader has a quorum ([`Confirmations::leads_a_quorum`]).
const TAG_QUORUM: u8 = 5;
/// A membership change (a node joining or leaving); far from the others so that request types
/// added meanwhile do not take its number.
const TAG_MEMBERSHIP: u8 = 32;

/// How long a membership change may take on the leader: a joining node is first caught up
/// with the log as a learner.
pub(crate) const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a proposal forwarded to the leader was not applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Forwarded {
    /// The peer is not (or no longer) the leader; it names the leader it knows.
    #[error("the peer is not the leader (leader: {0:?})")]
    NotLeader(Option<(NodeId, Member)>),
    /// The link or Raft failed; the proposal may or may not have been committed.
    #[error("{0}")]
    Failed(String),
}

/// A change of Raft's membership asked of the leader over the cluster link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MembershipRequest {
    /// Add the node: a learner first, caught up with the log, then a voter. Nothing happens
    /// if it is a voter already.
    Join {
        /// Its Raft id.
        id: NodeId,
        /// Its name and address.
        member: Member,
    },
    /// Remove the node from the membership (voter or learner). Nothing happens if it is not a
    /// member.
    Leave {
        /// Its Raft id.
        id: NodeId,
    },
}

/// Why a membership change was not made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum MembershipRefused {
    /// The peer belongs to no cluster yet (it was never initialized nor added).
    #[error("the peer belongs to no cluster yet")]
    NoCluster,
    /// The peer is not the leader; it names the leader it knows, if any.
    #[error("the peer is not the leader (leader: {0:?})")]
    NotLeader(Option<(NodeId, Member)>),
    /// The link or Raft failed, or the change was refused; it may have been made.
    #[error("{0}")]
    Failed(String),
}

/// Why the cluster's TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file cannot be read or holds nothing usable.
    #[error("{what}: {reason}")]
    Pem {
        /// Which file (CA, certificate or key) and its path.
        what: String,
        /// What was wrong.
        reason: String,
    },
    /// rustls refused the certificates or the key.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA cannot verify client certificates.
    #[error("the cluster CA cannot verify peers: {0}")]
    Verifier(String),
    /// noq refused the rustls configuration.
    #[error("QUIC: {0}")]
    Quic(String),
}

/// The QUIC configurations of a node: as a server (peers must present a certificate from the
/// CA) and as a client (with its own certificate, expecting the peer's name).
#[derive(Clone)]
pub struct Tls {
    server: noq::ServerConfig,
    client: noq::ClientConfig,
    /// As a client of a forwarding link (ALPN [`crate::router::FORWARD_ALPN`]).
    forward_client: noq::ClientConfig,
}

impl Tls {
    /// Reads the CA, the node's certificate chain and its key from PEM files.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|e| TlsError::Pem {
                what: format!("{what} {}", path.display()),
                reason: e.to_string(),
            })
        };
        Self::from_pem(
            &read("CA", ca)?,
            &read("certificate", cert)?,
            &read("key", key)?,
        )
    }

    /// Builds the configurations from PEM text.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let pem = |what: &str, reason: String| TlsError::Pem {
            what: what.to_owned(),
            reason,
        };
        let certs = |what: &str, bytes: &[u8]| {
            let certs = CertificateDer::pem_slice_iter(bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem(what, e.to_string()))?;
            if certs.is_empty() {
                return Err(pem(what, "no certificate".into()));
            }
            Ok(certs)
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in certs("CA", ca)? {
            roots.add(c)?;
        }
        let roots = Arc::new(roots);
        let chain = certs("certificate", cert)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| pem("key", e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        // Raft's link and the forwarding link (see `router.rs`) share the endpoint.
        server.alpn_protocols = vec![ALPN.to_vec(), crate::wire::FORWARD_ALPN.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        let mut forward_client = client.clone();
        forward_client.alpn_protocols = vec![crate::wire::FORWARD_ALPN.to_vec()];
        client.alpn_protocols = vec![ALPN.to_vec()];

        let quic = |e: noq::crypto::rustls::NoInitialCipherSuite| TlsError::Quic(e.to_string());
        let server = noq::ServerConfig::with_crypto(Arc::new(
            noq::crypto::rustls::QuicServerConfig::try_from(server).map_err(quic)?,
        ));
        let client = noq::ClientConfig::new(Arc::new(
            noq::crypto::rustls::QuicClientConfig::try_from(client).map_err(quic)?,
        ));
        let forward_client = noq::ClientConfig::new(Arc::new(
            noq::crypto::rustls::QuicClientConfig::try_from(forward_client).map_err(quic)?,
        ));
        Ok(Self {
            server,
            client,
            forward_client,
        })
    }
}

/// Binds the cluster endpoint: it accepts peers and dials them. Also returns the client
/// configuration of forwarding links (their ALPN, the endpoint's transport settings).
pub(crate) fn bind(
    tls: &Tls,
    listen: SocketAddr,
) -> io::Result<(noq::Endpoint, noq::ClientConfig)> {
    let mut transport = noq::TransportConfig::default();
    // Peers keep their links alive between heartbeats; an idle link means a dead peer.
    transport
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_idle_timeout(noq::IdleTimeout::try_from(Duration::from_secs(10)).ok())
        // Openraft keeps one request in flight per peer and kind; the cap bounds what a peer
        // can make a node hold (streams x MAX_MESSAGE). Unidirectional streams are the
        // forwarding link's message buckets (Raft's link never accepts one, so there a peer
        // can fill at most their flow-control windows).
        .max_concurrent_bidi_streams(noq::VarInt::from_u32(MAX_STREAMS))
        .max_concurrent_uni_streams(noq::VarInt::from_u32(crate::router::BUCKETS as u32));
    let transport = Arc::new(transport);
    let mut forward_client = tls.forward_client.clone();
    forward_client.transport_config(transport.clone());
    let mut server = tls.server.clone();
    server.transport_config(transport.clone());
    let endpoint = noq::Endpoint::server(server, listen)?;
    let mut client = tls.client.clone();
    client.transport_config(transport);
    endpoint.set_default_client_config(client);
    Ok((endpoint, forward_client))
}

/// Accepts peers until `stop`, answering their RPCs with `raft`; a forwarding link (told by
/// its ALPN) goes to `router`. The tasks it spawns are in `tasks`.
pub(crate) async fn serve(
    endpoint: noq::Endpoint,
    raft: Raft,
    stamp: Stamp,
    confirmations: Confirmations,
    router: crate::router::Router,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let raft = raft.clone();
        let stamp = stamp.clone();
        let confirmations = confirmations.clone();
        let router = router.clone();
        let stop = stop.clone();
        let inner = tasks.clone();
        tasks.spawn(async move {
            let handshake = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                handshake = incoming => handshake,
            };
            let conn = match handshake {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!(error = %e, "cluster handshake failed");
                    return;
                }
            };
            let names: Arc<[String]> = peer_names(&conn).into();
            if is_forwarding_link(&conn) {
                router.serve_link(conn, names).await;
                return;
            }
            loop {
                let (send, recv) = tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    stream = conn.accept_bi() => match stream {
                        Ok(s) => s,
                        Err(_) => break,
                    },
                };
                inner.spawn(answer(
                    raft.clone(),
                    stamp.clone(),
                    confirmations.clone(),
                    names.clone(),
                    send,
                    recv,
                ));
            }
        });
    }
}

/// Whether a peer dialled this node for a forwarding link rather than for Raft.
fn is_forwarding_link(conn: &noq::Connection) -> bool {
    conn.handshake_data()
        .and_then(|h| h.downcast::<noq::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
        .is_some_and(|p| p == crate::wire::FORWARD_ALPN)
}

/// The DNS names in the certificate a peer presented (verified by rustls against the CA).
fn peer_names(conn: &noq::Connection) -> Vec<String> {
    let Some(identity) = conn.peer_identity() else {
        return Vec::new();
    };
    let Ok(chain) = identity.downcast::<Vec<CertificateDer<'static>>>() else {
        return Vec::new();
    };
    let Some(Ok((_, cert))) = chain
        .first()
        .map(|c| x509_parser::parse_x509_certificate(c))
    else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(s) => Some(s.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// Whether a peer whose certificate carries `names` may speak for node `claimed`: a node in
/// this node's membership must present a certificate with its member name. A node not (yet)
/// in it may speak: a new node learns the membership from the leader's first request.
pub(crate) fn may_speak_for(raft: &Raft, names: &[String], claimed: Option<NodeId>) -> bool {
    let Some(id) = claimed else { return true };
    let metrics = raft.metrics();
    let metrics = metrics.borrow();
    match metrics.membership_config.membership().get_node(&id) {
        Some(member) => names.iter().any(|n| n.eq_ignore_ascii_case(&member.name)),
        None => true,
    }
}

/// Whether a peer whose certificate carries `names` may ask for `req`: a member may ask for
/// any change; a node not in the membership only to join itself, under its certificate's name.
fn may_change_membership(raft: &Raft, names: &[String], req: &MembershipRequest) -> bool {
    let metrics = raft.metrics();
    let metrics = metrics.borrow();
    let is_member = metrics
        .membership_config
        .membership()
        .nodes()
        .any(|(_, m)| names.iter().any(|n| n.eq_ignore_ascii_case(&m.name)));
    is_member
        || matches!(req, MembershipRequest::Join { member, .. }
            if names.iter().any(|n| n.eq_ignore_ascii_case(&member.name)))
}

/// Answers one RPC from a peer whose certificate carries `names`.
async fn answer(
    raft: Raft,
    stamp: Stamp,
    confirmations: Confirmations,
    names: Arc<[String]>,
    mut send: noq::SendStream,
    mut recv: noq::RecvStream,
) {
    let Ok(request) = recv.read_to_end(MAX_MESSAGE).await else {
        return;
    };
    let Some((&tag, body)) = request.split_first() else {
        return;
    };
    let impostor = |claimed: Option<NodeId>| {
        let refused = !may_speak_for(&raft, &names, claimed);
        if refused {
            tracing::warn!(?claimed, names = ?names, "a peer spoke for a node its certificate does not name");
        }
        refused
    };
    let reply = match tag {
        TAG_APPEND => match serde_json::from_slice::<AppendEntriesRequest<TypeConfig>>(body) {
            Ok(req) if impostor(req.vote.leader_id().voted_for()) => Err(None),
            Ok(req) => serde_json::to_vec(&raft.append_entries(req).await).map_err(Some),
            Err(e) => Err(Some(e)),
        },
        TAG_VOTE => match serde_json::from_slice::<VoteRequest<NodeId>>(body) {
            Ok(req) if impostor(req.vote.leader_id().voted_for()) => Err(None),
            Ok(req) => serde_json::to_vec(&raft.vote(req).await).map_err(Some),
            Err(e) => Err(Some(e)),
        },
        TAG_SNAPSHOT => match serde_json::from_slice::<InstallSnapshotRequest<TypeConfig>>(body) {
            Ok(req) if impostor(req.vote.leader_id().voted_for()) => Err(None),
            Ok(req) => serde_json::to_vec(&raft.install_snapshot(req).await).map_err(Some),
            Err(e) => Err(Some(e)),
        },
        // Any node of the cluster may propose.
        TAG_PROPOSE => match serde_json::from_slice::<Command>(body) {
            Ok(command) => {
                // Only a member whose certificate names it: the map of who was heard from
                // stays as small as the membership, and no peer speaks for another.
                if let Command::Sequenced { node, .. } = &command {
                    let member = raft
                        .metrics()
                        .borrow()
                        .membership_config
                        .membership()
                        .get_node(node)
                        .is_some();
                    if member && may_speak_for(&raft, &names, Some(*node)) {
                        stamp.proposed_by(*node);
                    }
                }
                serde_json::to_vec(&propose_here(&raft, &stamp, command).await).map_err(Some)
            }
            Err(e) => Err(Some(e)),
        },
        // Read-only, and every peer here has the cluster CA's certificate.
        TAG_QUORUM => {
            let leads = confirmations.leads_a_quorum(&raft, QUORUM_TTL).await;
            serde_json::to_vec(&leads).map_err(Some)
        }
        TAG_MEMBERSHIP => match serde_json::from_slice::<MembershipRequest>(body) {
            Ok(req) if !may_change_membership(&raft, &names, &req) => {
                tracing::warn!(?req, names = ?names, "a membership change from a peer that may not ask it");
                Err(None)
            }
            Ok(req) => {
                let answer = crate::node::change_membership_here(&raft, req).await;
                serde_json::to_vec(&answer).map_err(Some)
            }
            Err(e) => Err(Some(e)),
        },
        _ => {
            // Not a request of this protocol version: say nothing, the peer's call fails.
            let _ = send.reset(noq::VarInt::from_u32(1));
            return;
        }
    };
    match reply {
        Ok(bytes) => {
            if send.write_all(&bytes).await.is_ok() {
                let _ = send.finish();
                // Wait until the peer has it: dropping the stream earlier may lose the end.
                let _ = send.stopped().await;
            }
        }
        Err(Some(e)) => {
            tracing::debug!(error = %e, "undecodable cluster request");
            let _ = send.reset(noq::VarInt::from_u32(2));
        }
        Err(None) => {
            let _ = send.reset(noq::VarInt::from_u32(3));
        }
    }
}

/// How long a leader takes at most to confirm that it has a quorum.
pub(crate) const QUORUM_TTL: Duration = Duration::from_millis(500);

/// How old a confirmation may be and still answer a question ([`Confirmations`]): the period
/// of the leader's own watch, so that its rounds answer its followers' questions.
const CONFIRMATION_REUSE: Duration = crate::node::QUORUM_EVERY;

/// The latest confirmation that this node leads a quorum, shared by its own quorum watch and
/// its followers' questions ([`TAG_QUORUM`]): questions that come together cost one round of
/// heartbeats, not one each.
#[derive(Clone, Default)]
pub(crate) struct Confirmations {
    /// When the last successful round started, and in which term. Held across a round, so
    /// that a question asked meanwhile waits for its answer rather than starting another.
    last: Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, u64)>>>,
}

impl Confirmations {
    /// Whether this node leads and a majority of the voters acknowledged it (a round of
    /// heartbeats, openraft's `get_read_log_id`) within `ttl` of now, or in a round of the
    /// same term started at most [`CONFIRMATION_REUSE`] ago.
    pub(crate) async fn leads_a_quorum(&self, raft: &Raft, ttl: Duration) -> bool {
        let (leads, term) = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            (m.current_leader == Some(m.id), m.current_term)
        };
        if !leads {
            return false;
        }
        let deadline = tokio::time::Instant::now() + ttl;
        let Ok(mut last) = tokio::time::timeout_at(deadline, self.last.lock()).await else {
            return false;
        };
        if last.is_some_and(|(at, t)| t == term && at.elapsed() <= CONFIRMATION_REUSE) {
            return true;
        }
        let started = tokio::time::Instant::now();
        // The heartbeat round alone (not `ensure_linearizable`, which also waits for this
        // node to apply that far): a leader busy applying a backlog still leads a quorum.
        let confirmed = tokio::time::timeout_at(deadline, raft.get_read_log_id())
            .await
            .is_ok_and(|r| r.is_ok());
        if confirmed {
            *last = Some((started, term));
        }
        confirmed
    }
}

/// Proposes `command` on this node's Raft (it must lead); a claim gets the leader's word on
/// its session's owner first ([`Stamp::claim`]), and one past its deadline is refused.
pub(crate) async fn propose_here(
    raft: &Raft,
    stamp: &Stamp,
    mut command: Command,
) -> Result<Outcome, Forwarded> {
    if let Err(late) = stamp.claim(raft, &mut command) {
        // Refused wherever it is found late: never appended is always safe.
        return Ok(Outcome::Rejected(late));
    }
    match raft.client_write(command).await {
        Ok(response) => Ok(response.data),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(Forwarded::NotLeader(f.leader_id.zip(f.leader_node)))
        }
        Err(e) => Err(Forwarded::Failed(e.to_string())),
    }
}

/// When each peer last answered this node's `AppendEntries` (heartbeats included), or
/// forwarded it a proposal: a leader's view of which nodes are alive.
pub(crate) type Heard =
    Arc<std::sync::Mutex<std::collections::HashMap<NodeId, tokio::time::Instant>>>;

/// What a leader adds to a claim before proposing it: for how long, at least, the session's
/// owner has proposed nothing that the claim comes after (`owner_quiet_ms`), from which the
/// claimant's lease counts. Whatever the old owner sends its client waits for the commit of
/// a command it proposed (a confirmation that it still owns the session, or the step
/// itself), and goes out within the broker's late-commit bound (2 s) of that proposal, or
/// not at all. A command ahead of the claim in the log was
/// - appended in this leader's term: forwarded to it by the owner's node, which it then
///   recorded as heard (a proposal is recorded before it is appended);
/// - or appended earlier: then this leader held the entry before it stood for election,
///   which it did at least `election_timeout_min` after it last heard from a leader
///   (Raft's election timer), so the command was proposed that long before this term began.
///
/// So the owner has been quiet for the shorter of the two; a leader that owns the session
/// itself counts as heard now (it lets the session go when it applies the claim). Stamped as
/// it is proposed: a forward that arrives between the stamp and the claim's append is not
/// counted, a window of microseconds.
#[derive(Clone)]
pub(crate) struct Stamp {
    heard: Heard,
    /// The term this node leads and since when, once it does.
    led: Arc<std::sync::Mutex<Option<(u64, tokio::time::Instant)>>>,
    state: StateReader,
    election_timeout_min: Duration,
}

impl Stamp {
    /// Notes that `node` forwarded a proposal just now.
    fn proposed_by(&self, node: NodeId) {
        lock(&self.heard).insert(node, tokio::time::Instant::now());
    }

    /// Notes that this node leads `term` from now on, unless it knew already.
    pub(crate) fn leads(&self, term: u64) {
        let mut led = lock(&self.led);
        if led.is_none_or(|(t, _)| t != term) {
            *led = Some((term, tokio::time::Instant::now()));
        }
    }

    /// Sets a claim's `owner_quiet_ms` (see [`Stamp`]); 0 when this node is not known to
    /// lead its current term, or owns the session itself. A claim past its deadline
    /// (`not_after_ms`, by this node's clock) is refused instead.
    fn claim(&self, raft: &Raft, command: &mut Command) -> Result<(), Rejection> {
        let Command::ClaimSession {
            client_id,
            owner_quiet_ms,
            not_after_ms,
            ..
        } = command
        else {
            return Ok(());
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if *not_after_ms != 0 && now_ms > *not_after_ms {
            return Err(Rejection::ClaimTooLate {
                late_ms: now_ms - *not_after_ms,
            });
        }
        let (me, term) = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            (m.id, m.current_term)
        };
        let Some(since) = lock(&self.led)
            .filter(|(t, _)| *t == term)
            .map(|(_, at)| at)
        else {
            *owner_quiet_ms = 0;
            return Ok(());
        };
        let owner = self.state.read(|s| s.session(client_id).map(|o| o.owner));
        let quiet = match owner {
            Some(owner) if owner != me => {
                let now = tokio::time::Instant::now();
                let before_term = now.duration_since(since) + self.election_timeout_min;
                match lock(&self.heard).get(&owner) {
                    Some(at) => now.duration_since(*at).min(before_term),
                    None => before_term,
                }
            }
            _ => Duration::ZERO,
        };
        *owner_quiet_ms = u64::try_from(quiet.as_millis()).unwrap_or(u64::MAX);
        Ok(())
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// openraft's factory of peer clients.
#[derive(Clone)]
pub struct Network {
    endpoint: noq::Endpoint,
    heard: Heard,
    /// See [`Stamp`].
    led: Arc<std::sync::Mutex<Option<(u64, tokio::time::Instant)>>>,
}

impl Network {
    pub(crate) fn new(endpoint: noq::Endpoint) -> Self {
        Self {
            endpoint,
            heard: Heard::default(),
            led: Arc::default(),
        }
    }

    /// What this node adds to the claims it proposes as leader; `state` to find a session's
    /// owner.
    pub(crate) fn stamp(&self, state: StateReader, election_timeout_min: u64) -> Stamp {
        Stamp {
            heard: self.heard.clone(),
            led: self.led.clone(),
            state,
            election_timeout_min: Duration::from_millis(election_timeout_min),
        }
    }

    /// A link to `target`, dialled at its first use.
    pub(crate) fn peer(&self, target: NodeId, member: Member) -> Peer {
        Peer {
            endpoint: self.endpoint.clone(),
            target,
            member,
            conn: None,
            heard: self.heard.clone(),
        }
    }

    /// When `node` last answered an `AppendEntries` of this node.
    pub(crate) fn last_heard(&self, node: NodeId) -> Option<tokio::time::Instant> {
        self.heard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&node)
            .copied()
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Peer {
        self.peer(target, node.clone())
    }
}

/// The link to one peer, as openraft uses it.
pub struct Peer {
    endpoint: noq::Endpoint,
    target: NodeId,
    member: Member,
    conn: Option<noq::Connection>,
    heard: Heard,
}

/// A failure below Raft: the peer could not be reached, or the link failed mid-call.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("cannot reach {0}")]
    Unreachable(String),
    #[error("link to {0} failed: {1}")]
    Failed(String, String),
}

/// Dials `member` from `endpoint` (with `client`, else the endpoint's default client
/// configuration), within [`CONNECT_TIMEOUT`]; the error says why it could not be reached.
/// Raft's links and the forwarding links both dial this way.
pub(crate) async fn dial(
    endpoint: &noq::Endpoint,
    client: Option<noq::ClientConfig>,
    member: &Member,
) -> Result<noq::Connection, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&member.addr)
        .await
        .map_err(|e| e.to_string())?
        .collect();
    // A name may resolve to both families: take one the endpoint's socket can reach.
    let v4 = endpoint.local_addr().is_ok_and(|a| a.is_ipv4());
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4() == v4)
        .or(addrs.first())
        .copied()
        .ok_or_else(|| "no address".to_owned())?;
    let connecting = match client {
        Some(client) => endpoint.connect_with(client, addr, &member.name),
        None => endpoint.connect(addr, &member.name),
    }
    .map_err(|e| e.to_string())?;
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| e.to_string())
}

impl Peer {
    async fn connection(&mut self) -> Result<noq::Connection, LinkError> {
        if let Some(conn) = &self.conn {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let conn = dial(&self.endpoint, None, &self.member)
            .await
            .map_err(|why| LinkError::Unreachable(format!("{}: {why}", self.member)))?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// One stream: `body` out, the answer back, within `ttl`.
    async fn exchange(&mut self, body: &[u8], ttl: Duration) -> Result<Vec<u8>, LinkError> {
        let exchange = async {
            let conn = self.connection().await?;
            exchange_on(&conn, &self.member, body).await
        };
        match tokio::time::timeout(ttl, exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => {
                // The link may be broken: dial again next time.
                self.conn = None;
                Err(e)
            }
            Err(_) => Err(LinkError::Failed(
                self.member.to_string(),
                "timed out".into(),
            )),
        }
    }

    /// Whether this peer leads a quorum, as it says ([`Confirmations::leads_a_quorum`]); `None` if it
    /// cannot be asked within `ttl`.
    pub(crate) async fn leads_a_quorum(&mut self, ttl: Duration) -> Option<bool> {
        let answer = self.exchange(&[TAG_QUORUM], ttl).await.ok()?;
        serde_json::from_slice(&answer).ok()
    }

    /// The link to this peer for a proposal forwarded to it (the leader, as far as the caller
    /// knows): dialled now if there is none, then used without this `Peer`, so that
    /// proposals forwarded meanwhile do not wait for one another.
    pub(crate) async fn proposal_link(&mut self) -> Result<ProposalLink, Forwarded> {
        let conn = self
            .connection()
            .await
            .map_err(|e| Forwarded::Failed(e.to_string()))?;
        Ok(ProposalLink {
            conn,
            member: self.member.clone(),
        })
    }
}

/// A link to the leader that proposals are forwarded on (see [`Peer::proposal_link`]).
pub(crate) struct ProposalLink {
    conn: noq::Connection,
    member: Member,
}

impl ProposalLink {
    /// Forwards a proposal, within `ttl`.
    pub(crate) async fn propose(
        &self,
        command: &Command,
        ttl: Duration,
    ) -> Result<Outcome, Forwarded> {
        let mut body = vec![TAG_PROPOSE];
        serde_json::to_writer(&mut body, command).map_err(|e| Forwarded::Failed(e.to_string()))?;
        let answer =
            match tokio::time::timeout(ttl, exchange_on(&self.conn, &self.member, &body)).await {
                Ok(answer) => answer.map_err(|e| Forwarded::Failed(e.to_string()))?,
                Err(_) => {
                    return Err(Forwarded::Failed(
                        LinkError::Failed(self.member.to_string(), "timed out".into()).to_string(),
                    ))
                }
            };
        serde_json::from_slice::<Result<Outcome, Forwarded>>(&answer)
            .map_err(|e| Forwarded::Failed(e.to_string()))?
    }
}

/// One stream on `conn`: `body` out, the answer back.
async fn exchange_on(
    conn: &noq::Connection,
    member: &Member,
    body: &[u8],
) -> Result<Vec<u8>, LinkError> {
    let failed = |why: String| LinkError::Failed(member.to_string(), why);
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(e.to_string()))?;
    send.write_all(body)
        .await
        .map_err(|e| failed(e.to_string()))?;
    send.finish().map_err(|e| failed(e.to_string()))?;
    recv.read_to_end(MAX_MESSAGE)
        .await
        .map_err(|e| failed(e.to_string()))
}

impl Peer {
    /// Asks this peer, the leader as far as the caller knows, for a membership change.
    pub(crate) async fn membership(
        &mut self,
        req: &MembershipRequest,
        ttl: Duration,
    ) -> Result<(), MembershipRefused> {
        let mut body = vec![TAG_MEMBERSHIP];
        serde_json::to_writer(&mut body, req)
            .map_err(|e| MembershipRefused::Failed(e.to_string()))?;
        let answer = self
            .exchange(&body, ttl)
            .await
            .map_err(|e| MembershipRefused::Failed(e.to_string()))?;
        serde_json::from_slice::<Result<(), MembershipRefused>>(&answer)
            .map_err(|e| MembershipRefused::Failed(e.to_string()))?
    }

    /// One RPC: the request out, the answer back.
    async fn call<Req, Resp, E>(
        &mut self,
        tag: u8,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let mut body = vec![tag];
        serde_json::to_writer(&mut body, req)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let answer = match self.exchange(&body, option.hard_ttl()).await {
            Ok(answer) => answer,
            Err(e @ LinkError::Unreachable(_)) => {
                return Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(e) => return Err(RPCError::Network(NetworkError::new(&e))),
        };
        let result: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&answer)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.member.clone(),
                e,
            ))
        })
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let answer = self.call(TAG_APPEND, &rpc, &option).await;
        if answer.is_ok() {
            self.heard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(self.target, tokio::time::Instant::now());
        }
        answer
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(TAG_SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(TAG_VOTE, &rpc, &option).await
    }
}
