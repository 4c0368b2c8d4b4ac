//! The broker's per-connection machine: everything a connection decides, with no I/O, no
//! async runtime and no clock (time is passed in).
//!
//! [`ConnectionCore`] wraps the protocol core's [`ServerConnection`] and carries out what it
//! asks of the broker: authentication (passwords, SCRAM, hooks), sessions, ACLs, routing,
//! retained messages, the persist-then-acknowledge rule and back-pressure. A driver
//! ([`crate::drivers`]) moves bytes and wake-ups in and out:
//!
//! ```text
//!  driver                          ConnectionCore                      broker state (Inner)
//!  bytes on stream s ──────────▶ handle_input(now, s, ..)  ──route──▶  topic trie, sessions,
//!  mailbox woke      ──────────▶ handle_inbox(now, ..)     ──store──▶  storage (tickets)
//!  watermark moved   ──────────▶ handle_watermark(now, w)
//!  room / timer      ──────────▶ retry_blocked / handle_timeout(now)
//!  process(now); then:
//!  ◀── poll_request(): CheckPassword, AcquireSession  (answered later: authenticated(),
//!                                                      session_acquired())
//!  ◀── output(s).writable() bytes; wrote(s, n)
//!  ◀── wants_read(s), poll_timeout(), blocked_on(), waits_for_storage()
//! ```
//!
//! Routing and recording changes in storage are synchronous, non-blocking calls on the
//! broker's shared state: recording returns a [`Ticket`], and output that depends on it waits
//! in the stream's [`Output`] until the watermark the driver passes in covers it. Only what has
//! to wait for something else (a password check on the blocking pool, a session another
//! connection must hand over) is a [`Request`].
//!
//! # Streams
//!
//! Packets, output and back-pressure are per stream ([`StreamId`]): a byte-stream transport
//! uses [`StreamId::CONTROL`] only; MQTT over QUIC in multi-stream mode adds data streams. A
//! publication that waits for room in its subscribers' queues pauses reading of its own stream
//! only, and held output of one stream never holds another's. Deliveries go on the stream
//! where their subscription was made (a hint kept by this connection, never stored).
//!
//! # Back-pressure
//!
//! Reading of a stream pauses while its output holds [`WRITE_HIGH_WATER`] bytes, so a client
//! that does not read cannot make the broker buffer without bound. Publishers feeding a
//! backed-up client pause too: a QoS 0 or 1 publication that finds a subscriber's output
//! backed up or its queue full waits, with its stream's reading paused, until there is room,
//! so that under overload the broker reads no faster than it can deliver. A QoS 2 publication
//! waits the same way, but before any of its copies is routed, and is then routed to all in
//! one atomic write with its PUBREL state (see [`feed::Held`]). A subscriber that
//! makes no progress at all for [`BACKPRESSURE_WAIT`] is marked stalled; from then on what is
//! routed to it is dropped (and counted) until it reads again.

mod feed;
mod output;
mod sparse;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use tracing::{debug, info, warn};

use mqttd_proto::codec::PacketReader;
use mqttd_proto::server::{Accept, ConnectRequest, Event, ParkedConnection, ServerConnection};
use mqttd_proto::session::{Enqueued, OutboundState, Session};
use mqttd_proto::{
    ClientId, Delivery, InboundPublish, Message, MqttStr, Packet, PacketId, ProtocolVersion, QoS,
    ReasonCode, StreamId, Subscribe, TopicFilter, Unsubscribe,
};

use crate::auth::scram::MECHANISM;
use crate::auth::ScramServerFirstSent;
use crate::bridge::config::LOCAL_CLIENT_PREFIX;
use crate::broker::{
    update_flag, Acquired, Blocked, ConnInfo, ConnStats, Headed, Inbox, Inner, Mailbox, Matches,
    SessionHandle, SessionPermit, SessionReply, Slot, Subscriber, Waits,
};
use crate::hooks::{Action, ClientInfo, ConnectAttempt, Intercept, Peer, Transport, Verdict};
use crate::storage::{Batch, StoredWill, Ticket, Watermark};

use feed::{BlockedPublish, Held, RetainedFeed};
pub(crate) use output::Output;
use output::Outputs;
use sparse::SparseVec;

/// Output waiting beyond this many bytes pauses reading and makes publishers of QoS 0
/// messages for this client wait (see `SessionHandle::congested`).
pub(crate) const WRITE_HIGH_WATER: usize = 256 * 1024;
/// Publishers held back by this client's output resume once it is below this many bytes.
const WRITE_LOW_WATER: usize = 64 * 1024;
/// Output waiting beyond this many bytes drops QoS 0 deliveries: what the mailbox held when
/// the publishers started to wait lands between the two marks.
const QOS0_DROP_AT: usize = 4 * WRITE_HIGH_WATER;
/// How long a publication waits for room in a subscriber queue or output that makes no
/// progress before the message is dropped for that subscriber (which is then marked stalled).
/// Meanwhile the publisher's stream is not read from, so a subscriber that is slow but reading
/// sets the pace instead of losing messages, while one that stopped reading holds its
/// publishers up only this long. Long enough that a reader starved of CPU on a busy machine is
/// not taken for a stopped one (at 25 ms, four raw publishers on a loaded two-core machine made
/// the broker drop 98% for a subscriber that was reading).
pub(crate) const BACKPRESSURE_WAIT: Duration = Duration::from_millis(250);
/// How often a waiting publication looks again for room, besides being woken when there is.
const RETRY_INTERVAL: Duration = Duration::from_millis(2);

/// Something the core needs from outside before it can go on; the driver answers it with
/// the call each variant names. Until then the core reads nothing more.
#[derive(Debug)]
pub(crate) enum Request {
    /// Check a CONNECT's user name and password against the password file: costly work, to
    /// be run off the async workers with a bounded number at once (see [`crate::auth`]).
    /// Answer with [`ConnectionCore::authenticated`], or [`ConnectionCore::abandon`] if no
    /// answer can be had.
    CheckPassword(Box<PasswordCheck>),
    /// Find or create the session, taking it over from another connection if need be (see
    /// [`Inner::acquire_session`]). Answer with [`ConnectionCore::session_acquired`].
    AcquireSession(Box<SessionRequest>),
}

/// The credentials of a CONNECT whose password must be checked.
#[derive(Debug, Clone)]
pub(crate) struct PasswordCheck {
    client_id: ClientId,
    username: Option<MqttStr>,
    password: Option<Bytes>,
    version: ProtocolVersion,
    peer: Peer,
}

impl PasswordCheck {
    /// Runs the check: blocking work.
    pub(crate) fn verify(&self, inner: &Inner) -> Result<(), ReasonCode> {
        inner.authenticate(&ConnectAttempt {
            client_id: &self.client_id,
            username: self.username.as_ref(),
            password: self.password.as_ref(),
            version: self.version,
            peer: &self.peer,
        })
    }
}

/// The session a CONNECT asks for.
#[derive(Debug, Clone)]
pub(crate) struct SessionRequest {
    pub(crate) client_id: ClientId,
    pub(crate) clean_start: bool,
    pub(crate) expiry: u32,
}

/// What the core waits for after it made a [`Request`].
enum Waiting {
    /// The password check of this CONNECT.
    Password(ConnectRequest),
    /// The session for this CONNECT.
    Session(Box<Connecting>),
}

/// What a connection's core holds only for moments of its life (CONNECT, a SCRAM exchange, a
/// takeover): boxed together, so that an established connection pays one pointer for it.
#[derive(Default)]
struct Rare {
    /// A request for the driver, not yet taken.
    request: Option<Request>,
    /// What the core waits for: events are left unprocessed until it comes.
    waiting: Option<Waiting>,
    /// A SCRAM exchange waiting for the client's final message.
    scram: Option<Box<PendingScram>>,
    /// A session acquired for a connection that closed before CONNACK.
    unaccepted: Option<Box<Session>>,
    /// Where to hand the session when another connection takes it over.
    takeover_reply: Option<SessionReply>,
    /// Another node of the cluster took the session: nothing but the DISCONNECT goes out
    /// from now on, not even answers to what the client sent before (their changes went
    /// nowhere).
    abandoned: bool,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.request.is_none()
            && self.waiting.is_none()
            && self.scram.is_none()
            && self.unaccepted.is_none()
            && self.takeover_reply.is_none()
            && !self.abandoned
    }
}

/// Who a connection is with.
enum Who {
    /// Boxed, as everything an idle connection holds but rarely reads: its size is paid per
    /// connection.
    Peer(Box<Peer>),
    /// The accepted client, shared with the mailbox's [`ConnInfo`]: one copy per connection.
    Client(Arc<ClientInfo>),
}

impl Who {
    fn peer(&self) -> &Peer {
        match self {
            Self::Peer(peer) => peer,
            Self::Client(client) => &client.peer,
        }
    }

    fn client(&self) -> Option<&ClientInfo> {
        match self {
            Self::Peer(_) => None,
            Self::Client(client) => Some(client),
        }
    }
}

/// An authenticated CONNECT waiting for its session.
struct Connecting {
    request: ConnectRequest,
    client: ClientInfo,
    /// The identifier the broker assigned, for CONNACK.
    assigned: Option<ClientId>,
    /// The server's final SCRAM message, for CONNACK.
    auth_data: Option<Bytes>,
    /// The place under `max_sessions` of a persistent session this CONNECT may create.
    permit: Option<SessionPermit>,
}

/// The user a client certificate names, with `tls.use_identity_as_username` (or a peer's node
/// id, with `p2p.use_node_id_as_username`).
enum CertificateUser {
    /// The certificate's identity.
    Named(MqttStr),
    /// No certificate (or one that names nobody): an anonymous client.
    Anonymous,
    /// An identity that is no valid MQTT string: refused.
    Invalid,
}

/// A SCRAM exchange in progress: at CONNECT (with the request to finish) or a re-authentication.
struct PendingScram {
    state: ScramServerFirstSent,
    connect: Option<ConnectRequest>,
}

/// Stored messages routed to this session that wait for their change to be durable before the
/// session takes them, so that what the session sends later never waits for newer changes.
#[derive(Default)]
struct Awaiting {
    /// (change, messages), in arrival order.
    batches: VecDeque<(Ticket, VecDeque<Delivery>)>,
    /// Messages in `batches`.
    len: usize,
}

/// A core set aside while its connection is idle ([`ConnectionCore::park`]).
pub(crate) enum ParkedCore {
    /// The core as it was: something is going on that only the whole core holds.
    Whole(Box<ConnectionCore>),
    /// Nothing is going on: the core in its smallest form.
    Idle(Box<IdleCore>),
}

/// What an idle connection's core needs to be made again: the connection's protocol state in
/// its smallest form ([`ParkedConnection`]), who the client is, where its messages arrive,
/// its session and will, and where storage stood. Everything else the core holds is empty
/// while it is idle, and made again when it is needed.
pub(crate) struct IdleCore {
    conn: ParkedConnection,
    client: Arc<ClientInfo>,
    mailbox: Arc<Mailbox>,
    handle: Option<Arc<SessionHandle>>,
    scram_user: Option<Box<MqttStr>>,
    will: Option<Box<StoredWill>>,
    needs: Ticket,
    watermark: Watermark,
    max_packet_size: u32,
    closed_by_client: bool,
    close_reason: Option<ReasonCode>,
}

impl ParkedCore {
    /// The connection's mailbox (see [`ConnectionCore::mailbox`]).
    pub(crate) fn mailbox(&self) -> &Arc<Mailbox> {
        match self {
            Self::Whole(core) => &core.mailbox,
            Self::Idle(idle) => &idle.mailbox,
        }
    }

    /// When the core's timer is due (see [`ConnectionCore::poll_timeout`]).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Self::Whole(core) => core.poll_timeout(),
            // Nothing is blocked: the keep alive is the only timer.
            Self::Idle(idle) => idle.conn.poll_timeout(),
        }
    }

    /// The core again, as it was when it parked.
    pub(crate) fn unpark(self, inner: &Arc<Inner>) -> Box<ConnectionCore> {
        let idle = match self {
            Self::Whole(core) => return core,
            Self::Idle(idle) => idle,
        };
        let IdleCore {
            conn,
            client,
            mailbox,
            handle,
            scram_user,
            will,
            needs,
            watermark,
            max_packet_size,
            closed_by_client,
            close_reason,
        } = *idle;
        Box::new(ConnectionCore {
            inner: inner.clone(),
            who: Who::Client(client),
            conn: conn.unpark(),
            reader: PacketReader::new(max_packet_size),
            outputs: Outputs::default(),
            mailbox,
            handle,
            rare: None,
            scram_user,
            will,
            needs,
            stream_needs: SparseVec::new(),
            watermark,
            awaiting: None,
            blocked: SparseVec::new(),
            retained: None,
            hints: SparseVec::new(),
            closed_by_client,
            close_reason,
            resets: None,
        })
    }
}

/// One client connection's broker-side logic. See the module documentation.
pub(crate) struct ConnectionCore {
    inner: Arc<Inner>,
    /// Who is connected: the peer until CONNECT is accepted, then the client (which holds
    /// the peer, so it is kept once).
    who: Who,
    conn: ServerConnection,
    reader: PacketReader,
    outputs: Outputs,
    mailbox: Arc<Mailbox>,
    handle: Option<Arc<SessionHandle>>,
    /// What the core holds only while the connection is set up, re-authenticated or taken
    /// over; `None` the rest of the time.
    rare: Option<Box<Rare>>,
    /// The identity SCRAM established, which stands in for the user name.
    scram_user: Option<Box<MqttStr>>,
    /// The client's will, kept with its session record in storage.
    will: Option<Box<StoredWill>>,
    /// The latest storage change that output on every stream must wait for.
    needs: Ticket,
    /// The latest change that only output on one data stream must wait for: one caused by a
    /// packet from that stream, which its answer goes back on. Output on the control stream
    /// never waits for these, so a data stream's held acknowledgement does not hold PINGRESP,
    /// DISCONNECT or AUTH.
    stream_needs: SparseVec<(StreamId, Ticket)>,
    /// The latest watermark the driver passed in.
    watermark: Watermark,
    awaiting: Option<Box<Awaiting>>,
    /// Publications waiting for room in subscriber queues or output before they are
    /// acknowledged and their stream is read from again; at most one per stream.
    blocked: SparseVec<BlockedPublish>,
    /// Retained messages for new subscriptions still to send, at the pace the client reads.
    retained: Option<Box<RetainedFeed>>,
    /// Subscriptions made on data streams, whose messages go on those streams.
    hints: SparseVec<(TopicFilter, StreamId)>,
    /// Whether the client ended the connection (DISCONNECT, or its transport closed).
    closed_by_client: bool,
    /// Why the connection closed, once it has.
    close_reason: Option<ReasonCode>,
    /// Data streams to reset, for the driver to take with [`Self::poll_reset`].
    // One pointer in every core instead of a `Vec`'s three words: resets are rare, and the
    // core's size is paid per connection (see the size test in `tests.rs`).
    #[allow(clippy::box_collection)]
    resets: Option<Box<Vec<(StreamId, ReasonCode)>>>,
}

impl ConnectionCore {
    /// A connection from `peer` that has sent nothing yet; `watermark` is the storage's.
    pub(crate) fn new(inner: Arc<Inner>, peer: Peer, now: Instant, watermark: Watermark) -> Self {
        let conn = ServerConnection::new(inner.server_config.clone(), now);
        let reader = PacketReader::new(conn.max_packet_size());
        Self {
            inner,
            who: Who::Peer(Box::new(peer)),
            conn,
            reader,
            outputs: Outputs::default(),
            mailbox: Arc::default(),
            handle: None,
            rare: None,
            scram_user: None,
            will: None,
            needs: Ticket::NONE,
            stream_needs: SparseVec::new(),
            watermark,
            awaiting: None,
            blocked: SparseVec::new(),
            retained: None,
            hints: SparseVec::new(),
            closed_by_client: false,
            close_reason: None,
            resets: None,
        }
    }

    // ---- What the driver looks at ----------------------------------------------------------

    /// The inbox routed messages and takeover requests arrive in; the driver waits on it and
    /// passes what it holds to [`Self::handle_inbox`].
    pub(crate) fn mailbox(&self) -> &Arc<Mailbox> {
        &self.mailbox
    }

    /// Whether the connection is over: the driver sends what is left and then calls
    /// [`Self::finish`].
    pub(crate) fn is_closed(&self) -> bool {
        self.conn.is_closed()
    }

    /// The next request for the driver.
    pub(crate) fn poll_request(&mut self) -> Option<Request> {
        self.rare.as_mut().and_then(|r| r.request.take())
    }

    // Used by the multi-stream QUIC driver and the tests; a byte-stream connection has no
    // data stream to reset.
    #[cfg_attr(not(test), allow(dead_code))]
    /// The next data stream the driver must reset in both directions (QUIC STOP_SENDING and
    /// RESET_STREAM) with the reason as its error code: one that carried a malformed packet.
    /// The core already treats it as lost (see [`Self::stream_lost`]).
    pub(crate) fn poll_reset(&mut self) -> Option<(StreamId, ReasonCode)> {
        let resets = self.resets.as_mut()?;
        let reset = resets.pop();
        if resets.is_empty() {
            // Hold no allocation once they are taken.
            self.resets = None;
        }
        reset
    }

    // Used by the multi-stream QUIC driver and the tests.
    #[cfg_attr(not(test), allow(dead_code))]
    /// Why the connection closed (the reason of the DISCONNECT or refusing CONNACK, or of the
    /// close without one), once [`Self::is_closed`].
    pub(crate) fn close_reason(&self) -> Option<ReasonCode> {
        self.close_reason
    }

    // Used by the simulation now, and by the multi-stream QUIC driver.
    #[cfg_attr(not(test), allow(dead_code))]
    /// Whether the core waits for the answer to a request.
    pub(crate) fn is_waiting(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| r.waiting.is_some())
    }

    /// The output of `stream`: what may be written is [`Output::writable`]; report what was
    /// with [`Self::wrote`].
    pub(crate) fn output(&self, stream: StreamId) -> Option<&Output> {
        self.outputs.get(stream)
    }

    // Used by the simulation now, and by the multi-stream QUIC driver.
    #[cfg_attr(not(test), allow(dead_code))]
    /// Streams with output that may be written now.
    pub(crate) fn writable_streams(&self) -> impl Iterator<Item = StreamId> + '_ {
        self.outputs
            .iter()
            .filter(|(_, o)| !o.writable().is_empty())
            .map(|(s, _)| s)
    }

    /// Whether the driver should read from `stream` now: not while its output is backed up,
    /// a publication from it waits for room, or a request is outstanding; a data stream not
    /// before CONNACK (what a client sends on one meanwhile waits in its transport).
    pub(crate) fn wants_read(&self, stream: StreamId) -> bool {
        !self.conn.is_closed()
            && !self.is_waiting()
            && (stream.is_control() || self.conn.is_connected())
            && self
                .outputs
                .get(stream)
                .is_none_or(|o| o.buf.len() < WRITE_HIGH_WATER)
            && !self.blocked.iter().any(|b| b.stream == stream)
    }

    /// When [`Self::handle_timeout`] must next be called.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let retry = self.blocked.iter().map(|b| b.tried + RETRY_INTERVAL).min();
        let fenced = self
            .outputs
            .iter()
            .filter(|(_, o)| !o.buf.is_empty())
            .filter_map(|(_, o)| o.fenced_until())
            .min();
        [self.conn.poll_timeout(), retry, fenced]
            .into_iter()
            .flatten()
            .min()
    }

    /// A session whose room the first waiting publication waits for: the driver waits for
    /// its `room` to be signalled, then calls [`Self::retry_blocked`].
    pub(crate) fn blocked_on(&self) -> Option<Arc<SessionHandle>> {
        self.blocked
            .first()
            .and_then(|b| b.held.sessions().next().cloned())
    }

    /// Whether something waits for the storage's watermark to move: the driver passes each
    /// new one to [`Self::handle_watermark`].
    pub(crate) fn waits_for_storage(&self) -> bool {
        self.outputs.iter().any(|(_, o)| o.holding()) || self.awaiting.is_some()
    }

    /// Whether the connection is idle, so that a driver may set it aside without a task of its
    /// own (see `drivers::park`) until input comes, its mailbox gets something, its timer
    /// ([`Self::poll_timeout`]) is due, or the broker shuts down; nothing else can move it.
    /// That is: connected (CONNACK went), no request outstanding or answer awaited, reading
    /// wanted (not closed, not backed up), no publication waiting for room, nothing waiting
    /// for storage, no retained messages left to feed, and no output at all, held or not.
    /// Messages in flight to the client may be: what completes them comes as input.
    /// Call it after [`Self::process`].
    pub(crate) fn is_idle(&self) -> bool {
        self.conn.is_connected()
            && self.rare.as_ref().is_none_or(|r| r.request.is_none())
            && self.wants_read(StreamId::CONTROL)
            && self.blocked.is_empty()
            && self.awaiting.is_none()
            && self.retained.is_none()
            && self.outputs.iter().all(|(_, o)| o.buf.is_empty())
    }

    /// Gives back the memory of empty buffers, queues and tables, for an idle connection
    /// about to wait a while (a parked one): it then holds its state and nothing more.
    /// Changes nothing else.
    pub(crate) fn compact(&mut self) {
        if self.rare.as_ref().is_some_and(|r| r.is_empty()) {
            self.rare = None;
        }
        self.conn.compact();
        self.outputs.compact();
        self.stream_needs.release_if_empty();
        self.blocked.release_if_empty();
        self.hints.release_if_empty();
    }

    /// The core set aside for a while (see `drivers::park`): compacted, and in its smallest
    /// form ([`IdleCore`]) if it is idle ([`Self::is_idle`]) with nothing else going on (no
    /// message in flight either way or queued, no topic alias, no data stream, no
    /// subscription hint, no re-authentication); otherwise whole.
    pub(crate) fn park(mut self: Box<Self>) -> ParkedCore {
        self.compact();
        let idle = self.is_idle()
            && self.rare.is_none()
            && self.outputs.is_unused()
            && self.stream_needs.is_empty()
            && self.hints.is_empty()
            && self.resets.is_none()
            && matches!(self.who, Who::Client(_));
        if !idle {
            return ParkedCore::Whole(self);
        }
        let this = *self;
        let client = match this.who {
            Who::Client(client) => client,
            // Not reached: checked above.
            who @ Who::Peer(_) => return ParkedCore::Whole(Box::new(Self { who, ..this })),
        };
        let conn = match this.conn.park() {
            Ok(conn) => conn,
            Err(conn) => {
                return ParkedCore::Whole(Box::new(Self {
                    who: Who::Client(client),
                    conn,
                    ..this
                }))
            }
        };
        // Named one by one, so that a field added later is not forgotten here: what an idle
        // connection keeps, and (`_`) what it gives up, empty.
        let Self {
            inner: _,
            who: _,
            conn: _,
            reader,
            outputs: _,
            mailbox,
            handle,
            rare: _,
            scram_user,
            will,
            needs,
            stream_needs: _,
            watermark,
            awaiting: _,
            blocked: _,
            retained: _,
            hints: _,
            closed_by_client,
            close_reason,
            resets: _,
        } = this;
        ParkedCore::Idle(Box::new(IdleCore {
            conn,
            client,
            mailbox,
            handle,
            scram_user,
            will,
            needs,
            watermark,
            max_packet_size: reader.max_packet_size(),
            closed_by_client,
            close_reason,
        }))
    }

    /// The rarely used state, made if there is none.
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_default()
    }

    /// What the core waits for, taken.
    fn take_waiting(&mut self) -> Option<Waiting> {
        self.rare.as_mut()?.waiting.take()
    }

    // ---- Inputs ------------------------------------------------------------------------------

    /// Decodes and handles the packets `input` holds from `stream`, leaving a partial packet
    /// in it.
    pub(crate) fn handle_input(&mut self, now: Instant, stream: StreamId, input: &mut BytesMut) {
        self.handle_input_within(now, stream, input, usize::MAX);
    }

    /// As [`Self::handle_input`], but stops after the packet that takes what it decoded to
    /// `budget` bytes or more, so that a driver can let other connections run before it goes
    /// on. Returns whether it stopped there with bytes left in `input`, which may hold more
    /// packets; they are to be handled before anything more is read.
    pub(crate) fn handle_input_within(
        &mut self,
        now: Instant,
        stream: StreamId,
        input: &mut BytesMut,
        budget: usize,
    ) -> bool {
        let mut decoded = 0;
        loop {
            let before = input.len();
            match self.reader.read(input, self.conn.version()) {
                Ok(Some(packet)) => {
                    self.handle_packet(now, stream, packet);
                    if self.conn.is_closed() {
                        return false;
                    }
                    decoded += before - input.len();
                    if decoded >= budget {
                        return !input.is_empty();
                    }
                }
                Ok(None) => return false,
                Err(error) if !stream.is_control() && self.conn.is_connected() => {
                    // Only this stream is at fault: it is reset, and the connection and its
                    // other streams go on. Counted once, here.
                    // debug, not info: a client may repeat this on new streams without end.
                    debug!(%error, %stream, "malformed packet on a data stream; resetting it");
                    self.inner.metrics.protocol_errors.inc();
                    input.clear();
                    self.resets
                        .get_or_insert_with(Box::default)
                        .push((stream, error.reason_code()));
                    self.stream_lost(now, stream);
                    return false;
                }
                Err(error) => {
                    // Counted in `protocol_errors` once, with the close it causes.
                    debug!(%error, %stream, "malformed packet");
                    self.conn.handle_decode_error(now, &error);
                    return false;
                }
            }
        }
    }

    /// Handles one decoded packet from `stream`.
    pub(crate) fn handle_packet(&mut self, now: Instant, stream: StreamId, packet: Packet) {
        self.conn.handle_packet_on(now, stream, packet);
    }

    /// Whether, in multi-stream mode (QUIC data streams), the connection's output holds a
    /// backlog (what makes publishers of QoS 0 wait, see `update_pressure`). The session's
    /// signals of progress to the publishers waiting on it (a write, a delivery taken from
    /// the mailbox, room made by an acknowledgement) then count only when they move a stream
    /// that holds the backlog: a client that stopped reading one stream while it uses another
    /// would otherwise look busy forever, and hold the publishers feeding the stalled stream
    /// instead of being marked stalled. A single-stream connection is not concerned: its one
    /// output is the backlog.
    fn stream_backed_up(&self) -> bool {
        self.outputs.iter().nth(1).is_some() && self.outputs.len() >= WRITE_LOW_WATER
    }

    /// The driver read `n` bytes.
    pub(crate) fn received(&self, n: usize) {
        self.inner.metrics.bytes_received.inc_by(n as u64);
        ConnStats::add(&self.mailbox.stats.bytes_in, n);
    }

    /// The transport took `n` bytes of `stream`'s writable output.
    pub(crate) fn wrote(&mut self, stream: StreamId, n: usize) {
        self.inner.metrics.bytes_sent.inc_by(n as u64);
        ConnStats::add(&self.mailbox.stats.bytes_out, n);
        // Whether the stream was backed up when the transport took this: then publishers
        // waiting for this client see it move.
        let backed_up = !self.wants_read(stream);
        // Whether this write moves the backlog publishers may be waiting on: with a stream
        // backed up, a write on another says nothing of it (see `stream_backed_up`).
        let moves_backlog = !self.stream_backed_up()
            || self
                .outputs
                .get(stream)
                .is_some_and(|o| o.buf.len() >= WRITE_LOW_WATER);
        self.outputs.get_mut(stream).advance(n);
        if let Some(handle) = self.handle.as_ref().filter(|_| moves_backlog) {
            handle.wrote(backed_up);
        }
    }

    // Used by the simulation now, and by the multi-stream QUIC driver.
    #[cfg_attr(not(test), allow(dead_code))]
    /// A data stream ended while the connection lives on (see
    /// [`ServerConnection::stream_lost`]); losing the control stream loses the connection.
    pub(crate) fn stream_lost(&mut self, now: Instant, stream: StreamId) {
        self.conn.stream_lost(now, stream);
        if stream.is_control() {
            return;
        }
        self.outputs.remove(stream);
        self.hints.retain(|(_, s)| *s != stream);
        // What was owed on it now goes on the control stream, and still waits for the changes
        // it acknowledges; the entry goes, so that streams that come and go leave nothing.
        if let Some(at) = self.stream_needs.iter().position(|(s, _)| *s == stream) {
            if let Some((_, ticket)) = self.stream_needs.swap_remove(at) {
                self.needs.merge(ticket);
            }
        }
        // Its waiting publications were read: they are still routed, and their
        // acknowledgements go on the control stream.
        for b in self.blocked.iter_mut() {
            if b.stream == stream {
                b.stream = StreamId::CONTROL;
            }
        }
    }

    /// The transport failed or the client closed it.
    pub(crate) fn connection_lost(&mut self, now: Instant) {
        self.conn.connection_lost(now);
    }

    /// The broker is shutting down: DISCONNECT 0x8B.
    pub(crate) fn shutdown(&mut self, now: Instant) {
        self.conn.disconnect(now, ReasonCode::ServerShuttingDown);
    }

    /// Runs timers due at `now`: the protocol core's, and the next look for room of waiting
    /// publications.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.conn.handle_timeout(now);
        if self.blocked.iter().any(|b| now >= b.tried + RETRY_INTERVAL) {
            self.retry_blocked(now);
        }
    }

    /// What the mailbox held: messages routed to the session, and perhaps another
    /// connection's request for the session.
    pub(crate) fn handle_inbox(&mut self, now: Instant, inbox: Inbox) {
        if !inbox.deliveries.is_empty() && !self.stream_backed_up() {
            // Publishers waiting for room in the mailbox see it move.
            if let Some(handle) = &self.handle {
                handle.progress.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(reply) = inbox.takeover {
            self.rare().takeover_reply = Some(reply);
            let abandoned = inbox.abandon.is_some();
            self.rare().abandoned = abandoned;
            if abandoned && self.cut_held_output() {
                // Nothing may precede CONNACK, not even DISCONNECT.
                self.conn.connection_lost(now);
            } else {
                self.conn.disconnect(now, ReasonCode::SessionTakenOver);
            }
            if let Some(stopped) = inbox.abandon {
                let _ = stopped.send(());
            }
        }
        if let Some(reason) = inbox.kick {
            info!(%reason, "disconnected by the broker");
            self.conn.disconnect(now, reason);
        }
        // Stored messages enter the session once they are durable, so that what the session
        // sends later never waits for newer changes.
        let waits = self.inner.durable && (!inbox.ticket.is_none() || self.awaiting.is_some());
        if waits {
            self.refresh_watermark();
            let awaiting = self.awaiting.get_or_insert_with(Box::default);
            awaiting.len += inbox.deliveries.len();
            awaiting.batches.push_back((inbox.ticket, inbox.deliveries));
            self.deliver_durable(now);
        } else {
            for delivery in inbox.deliveries {
                self.deliver(now, delivery);
            }
        }
    }

    /// The storage's watermark moved to `watermark`: held output and stored messages it
    /// covers are released. If storage failed while something waits for it, the connection
    /// closes: what waits acknowledges changes that will never be durable, so it never goes
    /// out, and the DISCONNECT saying why goes instead. The same if the storage failed since
    /// the last watermark this connection saw (it may have recovered already, and what waits
    /// may be lost), or if the latest failure lost what the oldest held output waits for.
    pub(crate) fn handle_watermark(&mut self, now: Instant, watermark: Watermark) {
        if self.abandon_output_if_told() {
            return;
        }
        let missed_failure = watermark.failures != self.watermark.failures;
        self.watermark = watermark;
        let lost = |t: &Ticket| watermark.lost(*t) || (missed_failure && !t.is_none());
        let mut holding = false;
        let mut lost_held = false;
        for output in self.outputs.iter_mut() {
            // After a failure this connection did not see, nothing is released: what waits
            // may have been lost, and a later watermark may cover its number. Otherwise
            // release stops at a lost ticket (never covered), which is then the first held.
            if !missed_failure {
                output.release(watermark);
            }
            lost_held |= output.first_held().is_some_and(|t| lost(&t));
            holding |= output.holding();
        }
        let front = self
            .awaiting
            .as_ref()
            .and_then(|a| a.batches.front().map(|(t, _)| *t));
        let stuck = front.is_some_and(|t| !watermark.covers(t) || missed_failure);
        let lost_awaiting = front.is_some_and(|t| lost(&t));
        if (watermark.failed && (holding || stuck)) || lost_held || lost_awaiting {
            warn!("storage failed; closing the connection");
            if self.cut_held_output() {
                // Nothing may precede CONNACK, not even DISCONNECT.
                self.conn.connection_lost(now);
            } else {
                self.conn.disconnect(now, ReasonCode::UnspecifiedError);
            }
            return;
        }
        self.deliver_durable(now);
    }

    /// If another node took the session while this connection handed it over
    /// ([`Mailbox::abandon_output`]): drops what the output holds back, and from now on sends
    /// nothing but DISCONNECT. Returns whether it was told.
    fn abandon_output_if_told(&mut self) -> bool {
        if !self.mailbox.output_abandoned() {
            return false;
        }
        if !self.rare.as_ref().is_some_and(|r| r.abandoned) {
            self.rare().abandoned = true;
            let _ = self.cut_held_output();
        }
        true
    }

    /// Drops the output held back for storage, which will never go out; returns whether a
    /// CONNACK was among it.
    fn cut_held_output(&mut self) -> bool {
        let mut connack_cut = false;
        for output in self.outputs.iter_mut() {
            connack_cut |= output.cut_held();
        }
        self.needs = Ticket::NONE;
        self.stream_needs.clear();
        connack_cut
    }

    /// Before something starts waiting for storage: the connection takes the storage's
    /// latest watermark, so that a failure that came and went while nothing here waited is
    /// not taken for one it missed while waiting.
    fn refresh_watermark(&mut self) {
        if !self.waits_for_storage() {
            self.watermark = *self.inner.storage.watermark().borrow();
        }
    }

    /// Releases held output the watermark covers, and nothing else: for the last output of a
    /// connection that closed.
    pub(crate) fn release_output(&mut self, watermark: Watermark) {
        if self.abandon_output_if_told() {
            return;
        }
        self.watermark = watermark;
        for output in self.outputs.iter_mut() {
            output.release(watermark);
        }
    }

    /// The answer to [`Request::CheckPassword`].
    pub(crate) fn authenticated(&mut self, now: Instant, verdict: Result<(), ReasonCode>) {
        let Some(Waiting::Password(request)) = self.take_waiting() else {
            return;
        };
        match verdict {
            Ok(()) => self.finish_connect(now, request, None),
            Err(reason) => {
                info!(%reason, username = ?request.connect.username, "authentication failed");
                self.refuse(now, reason);
            }
        }
    }

    /// No answer can be had to the outstanding request (no turn before the CONNECT deadline,
    /// shutdown): the CONNECT is refused with `reason`.
    pub(crate) fn abandon(&mut self, now: Instant, reason: ReasonCode) {
        if self.take_waiting().is_some() {
            let _ = self.conn.reject(now, reason);
        }
    }

    /// The answer to [`Request::AcquireSession`]: CONNACK follows.
    pub(crate) fn session_acquired(&mut self, now: Instant, acquired: Acquired) {
        if let Some(reason) = acquired.refused {
            self.abandon(now, reason);
            return;
        }
        let Some(Waiting::Session(connecting)) = self.take_waiting() else {
            // Not asked for: hand it straight back to the broker.
            if acquired.session.expiry_interval() > 0 {
                self.inner.persistent_sessions.count(&acquired.handle, None);
            }
            self.handle = Some(acquired.handle);
            self.rare().unaccepted = Some(Box::new(acquired.session));
            return;
        };
        let Connecting {
            request,
            client,
            assigned,
            auth_data,
            permit,
        } = *connecting;
        // Counted from now on, even if the client is gone already: the session outlives it.
        if acquired.session.expiry_interval() > 0 {
            self.inner
                .persistent_sessions
                .count(&acquired.handle, permit);
        }
        self.handle = Some(acquired.handle);
        if self.conn.is_closed() {
            // The client left while the session was being acquired: keep the session.
            debug!("connection closed during CONNECT");
            self.rare().unaccepted = Some(Box::new(acquired.session));
            return;
        }
        let mut accept = Accept::new(acquired.session, acquired.present);
        accept.assigned_client_id = assigned.filter(|_| client.version == ProtocolVersion::V5);
        accept.authentication_data = auth_data;
        if let Err(error) = self.conn.accept(now, accept) {
            warn!(%error, "CONNECT could not be accepted");
            return;
        }
        info!(version = %client.version, session_present = acquired.present, keep_alive = request.keep_alive, "client connected");
        self.inner.metrics.clients_connected.inc();
        self.inner.metrics.clients_over(client.peer.transport).inc();
        self.inner.hooks.on_connected(&client);
        if let Some(handle) = &self.handle {
            update_flag(&handle.persistent, request.session_expiry_interval > 0);
        }
        // Kept in storage with the session, so that it is published even if the broker
        // crashes while the client is connected.
        self.will = request.connect.will.clone().map(|will| {
            let delay = will.properties.will_delay_interval.unwrap_or(0);
            Box::new(StoredWill { will, delay })
        });
        self.save_session(StreamId::CONTROL);
        let client = Arc::new(client);
        let info = Box::new(ConnInfo {
            client: client.clone(),
            keep_alive: request.keep_alive,
            clean_start: request.connect.clean_start,
            session_expiry: request.session_expiry_interval,
            connected_at: now,
        });
        if self.mailbox.conn.set(info).is_ok() {
            self.inner.count_connection(&client.peer.listener);
        }
        self.who = Who::Client(client);
    }

    /// Tries again to hand over what waits for room; acknowledges each publication once
    /// nothing of it waits, and goes on with the publications read after it.
    pub(crate) fn retry_blocked(&mut self, now: Instant) {
        let mut done = Vec::new();
        let mut batch = Batch::direct(&*self.inner.storage);
        let mut i = 0;
        while let Some(b) = self.blocked.get_mut(i) {
            let progress = b.held.progress();
            if progress != b.progress {
                b.progress = progress;
                b.since = now;
            }
            b.tried = now;
            let give_up = now.saturating_duration_since(b.since) >= BACKPRESSURE_WAIT;
            match &mut b.held {
                Held::Copies(deliveries) => {
                    self.inner
                        .retry_blocked(now, deliveries, give_up, &mut batch);
                }
                Held::Whole { message, waits } => {
                    let key = self.handle.as_ref().map(|h| h.key);
                    *waits = self.inner.lacking_room(message, key);
                    if give_up {
                        // As for a QoS 1 copy: a session that made no progress at all is
                        // marked stalled, and this publication's copy for it dropped.
                        for handle in waits.drain(..) {
                            let _ = update_flag(&handle.stalled, true);
                        }
                    }
                }
            }
            if b.held.is_empty() {
                done.extend(self.blocked.remove(i));
            } else {
                i += 1;
            }
        }
        let ticket = batch.commit();
        self.depends_on(ticket);
        for mut b in done {
            if let Held::Whole { message, .. } = &b.held {
                let message = message.clone();
                b.reason = self.route_publication(
                    now,
                    b.stream,
                    &message,
                    b.packet_id,
                    None,
                    &mut Blocked::new(),
                );
            }
            if let Some(packet_id) = b.packet_id {
                let _ = self.conn.publish_ack(packet_id, b.reason);
            }
            for publish in b.later {
                self.on_publish(now, b.stream, publish);
            }
        }
    }

    /// Does what the inputs made due: handles the protocol core's events (stopping at one
    /// that needs a [`Request`]), sends retained messages while the client keeps up, encodes
    /// what is to be sent into the streams' outputs, and tells publishers how much room this
    /// session has. Call it after every input, before looking at the outputs.
    pub(crate) fn process(&mut self, now: Instant) {
        self.process_events(now);
        self.feed_retained(now);
        self.flush_transmits();
        self.refence_late(now);
        self.update_pressure();
    }

    /// Fenced PUBLISHes not written by their fence's deadline (this process was paused
    /// between their release and the write, or the client reads slowly) wait for a new
    /// fence: nothing leaves on the strength of a confirmation that a new owner of the
    /// session may no longer wait for. The driver writes only after a turn's `process`, and
    /// wakes for the deadline ([`Self::poll_timeout`]).
    fn refence_late(&mut self, now: Instant) {
        let late: smallvec::SmallVec<[StreamId; 2]> = self
            .outputs
            .iter()
            .filter(|(_, o)| !o.buf.is_empty() && o.fenced_until().is_some_and(|u| u <= now))
            .map(|(s, _)| s)
            .collect();
        if late.is_empty() {
            return;
        }
        let Some(id) = self.client_id().cloned() else {
            return;
        };
        let fence = self.inner.storage.delivery_fence(&id);
        self.refresh_watermark();
        let covered = self.watermark.covers(fence.ticket);
        for stream in late {
            self.depends_on_for(stream, fence.ticket);
            self.outputs
                .get_mut(stream)
                .refence(fence.ticket, fence.until, covered);
        }
    }

    /// Moves the session to where it lives next, once the connection is over: the
    /// connection that took it over, the broker's store of offline sessions, or nowhere if it
    /// ended. `wall` is the wall-clock time, recorded with a parked session. Returns whether
    /// the client ended the connection (then there is nothing to linger for).
    pub(crate) fn finish(&mut self, now: Instant, wall: SystemTime) -> bool {
        // Before the hand-off, which takes the connection out of the admin API's live view:
        // a listing then finds its counters in the listener's totals or in that view.
        if let Some(conn) = self.mailbox.conn.get() {
            self.inner
                .fold_connection(&conn.client.peer.listener, &self.mailbox.stats);
        }
        self.hand_off_session(now, wall);
        self.closed_by_client
    }

    // ---- The machine -------------------------------------------------------------------------

    /// Output produced from now on waits until storage has made the change `ticket` stands
    /// for durable.
    fn depends_on(&mut self, ticket: Ticket) {
        self.depends_on_for(StreamId::CONTROL, ticket);
    }

    /// Output on `stream` produced from now on waits until storage has made the change
    /// `ticket` stands for durable; for the control stream, output on every stream does.
    fn depends_on_for(&mut self, stream: StreamId, ticket: Ticket) {
        if !self.inner.durable || ticket.is_none() {
            return;
        }
        // Events of a stream lost before they were handled come tagged as the control
        // stream's (`ServerConnection::stream_lost`), and their answers wait here with it.
        if stream.is_control() {
            self.needs.merge(ticket);
            return;
        }
        match self.stream_needs.iter_mut().find(|(s, _)| *s == stream) {
            Some((_, t)) => t.merge(ticket),
            None => self.stream_needs.push((stream, ticket)),
        }
    }

    /// The latest change output on `stream` must wait for.
    fn needs_of(&self, stream: StreamId) -> Ticket {
        let mut needs = self.needs;
        if let Some((_, t)) = self.stream_needs.iter().find(|(s, _)| *s == stream) {
            needs.merge(*t);
        }
        needs
    }

    fn client_id(&self) -> Option<&ClientId> {
        self.handle.as_ref().map(|h| &h.client_id)
    }

    /// Tells publishers how much this session can take: whether its queue is full, whether
    /// its output is backed up (with hysteresis: publishers woken when the output drains have
    /// room for a good batch each before it backs up again), and how many messages its
    /// mailbox may hold.
    fn update_pressure(&mut self) {
        let Some(handle) = &self.handle else {
            return;
        };
        if let Some(s) = self.conn.session() {
            ConnStats::set(&self.mailbox.stats.queued, s.queued().len());
            ConnStats::set(&self.mailbox.stats.in_flight, s.in_flight_len());
        }
        let (saturated, capacity, backlog) = self.conn.session().map_or((false, 0, 0), |s| {
            let limits = s.limits();
            let window = usize::from(self.inner.config.max_inflight_messages);
            let awaiting = self.awaiting.as_ref().map_or(0, |a| a.len);
            // While retained messages are being sent, routed ones wait behind them: that
            // queue is the one that must have room.
            let (queued, in_flight) = match &self.retained {
                Some(feed) => (feed.deferred.len(), 0),
                None => (s.queued().len(), s.in_flight_len().min(window)),
            };
            let used = queued + in_flight + awaiting;
            (
                queued >= limits.max_messages,
                (limits.max_messages + window).saturating_sub(used),
                s.queued().len() + s.in_flight_len() + awaiting,
            )
        });
        if handle.backlog.load(Ordering::Relaxed) != backlog {
            handle.backlog.store(backlog, Ordering::Relaxed);
        }
        let limit = if handle.congested.load(Ordering::Relaxed) {
            WRITE_LOW_WATER
        } else {
            WRITE_HIGH_WATER
        };
        handle.set_congested(self.outputs.len() >= limit);
        handle.set_saturated(saturated);
        let before = handle.capacity.load(Ordering::Relaxed);
        if before != capacity {
            handle.capacity.store(capacity, Ordering::Relaxed);
            if capacity > before && !self.stream_backed_up() {
                handle.progress.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Encodes what the protocol core has to send into the outputs of its streams; what was
    /// produced after a change that is not durable yet waits for it.
    fn flush_transmits(&mut self) {
        let Some(version) = self.conn.version() else {
            return;
        };
        // Per stream written to: where this round's output starts, and where a CONNACK ends.
        let mut touched: Vec<(StreamId, usize, Option<usize>)> = Vec::new();
        let abandoned = self.rare.as_ref().is_some_and(|r| r.abandoned);
        // The session's fence, asked once a round: every PUBLISH of the round waits for it.
        let mut round_fence: Option<crate::storage::Fence> = None;
        while let Some((stream, packet)) = self.conn.poll_transmit_tagged() {
            // Answers the protocol core queued before it saw the takeover (a PUBREL for a
            // PUBREC it had read) are cut with what was held back.
            if abandoned && !matches!(packet, Packet::Disconnect(_)) {
                continue;
            }
            let mut fenced = None;
            if matches!(packet, Packet::Publish(_)) && self.persistent() {
                // In a cluster, a PUBLISH leaves only while this node is known to own the
                // session (`Storage::delivery_fence`).
                if let Some(id) = self.client_id() {
                    let fence =
                        *round_fence.get_or_insert_with(|| self.inner.storage.delivery_fence(id));
                    self.depends_on_for(stream, fence.ticket);
                    fenced = fence.until;
                }
            }
            let output = self.outputs.get_mut(stream);
            let at = match touched.iter().position(|(s, ..)| *s == stream) {
                Some(at) => at,
                None => {
                    touched.push((stream, output.buf.len(), None));
                    touched.len() - 1
                }
            };
            if matches!(packet, Packet::Publish(_)) {
                self.inner.metrics.messages_sent.inc();
                ConnStats::add(&self.mailbox.stats.messages_out, 1);
            }
            if let Err(e) = packet.encode(version, &mut output.buf) {
                warn!(error = %e, "dropping a packet that cannot be encoded");
            }
            if let Some(until) = fenced {
                output.fenced(output.buf.len(), until);
            }
            if matches!(packet, Packet::ConnAck(_)) {
                if let Some(t) = touched.get_mut(at) {
                    t.2 = Some(output.buf.len());
                }
            }
        }
        // Everything encoded now on a stream was produced after the changes that stream's
        // output depends on: it all waits for them.
        for (stream, start, connack_end) in touched {
            let needs = self.needs_of(stream);
            if needs.is_none() {
                continue;
            }
            self.refresh_watermark();
            if self.watermark.covers(needs) {
                continue;
            }
            let output = self.outputs.get_mut(stream);
            if output.buf.len() > start {
                output.hold(start, needs, connack_end);
            }
        }
    }

    /// Hands the session the stored messages whose changes are now durable, oldest first.
    fn deliver_durable(&mut self, now: Instant) {
        let watermark = self.watermark;
        let mut ready = Vec::new();
        if let Some(awaiting) = &mut self.awaiting {
            while awaiting
                .batches
                .front()
                .is_some_and(|(t, _)| watermark.covers(*t))
            {
                if let Some((_, batch)) = awaiting.batches.pop_front() {
                    awaiting.len -= batch.len();
                    ready.extend(batch);
                }
            }
            if awaiting.batches.is_empty() {
                self.awaiting = None;
            }
        }
        for delivery in ready {
            self.deliver(now, delivery);
        }
    }

    /// Hands a routed message to the session, after the retained messages still being sent.
    fn deliver(&mut self, now: Instant, delivery: Delivery) {
        match &mut self.retained {
            Some(feed) => feed.deferred.push_back(delivery),
            None => self.deliver_now(now, delivery),
        }
    }

    /// Sends retained messages for new subscriptions while the client keeps up: until the
    /// output reaches its high-water mark or the session's queue is full. The core comes back
    /// here when the client has read or acknowledged something. What was routed meanwhile
    /// follows at the same pace, and then the feed ends.
    fn feed_retained(&mut self, now: Instant) {
        let Some(mut feed) = self.retained.take() else {
            return;
        };
        while !self.conn.is_closed() {
            // Encoded now, so that the output's size says how far the client is behind.
            self.flush_transmits();
            if self.outputs.len() >= WRITE_HIGH_WATER {
                self.retained = Some(feed);
                return;
            }
            let Some(delivery) = feed.next(now).or_else(|| feed.deferred.pop_front()) else {
                break;
            };
            let room = self.conn.session().is_some_and(|s| {
                let limits = s.limits();
                s.queued().len() < limits.max_messages
                    && (limits.max_bytes == 0
                        || s.queued_bytes() + delivery.message.weight() <= limits.max_bytes)
            });
            if !room {
                feed.next = Some(delivery);
                self.retained = Some(feed);
                return;
            }
            self.deliver_now(now, delivery);
        }
    }

    /// The stream a delivery goes on: that of the data stream its subscription was made on,
    /// if any, else the control stream.
    fn stream_for(&self, delivery: &Delivery) -> StreamId {
        if self.hints.is_empty() {
            return StreamId::CONTROL;
        }
        let found = match &delivery.shared {
            Some(shared) => self.hints.iter().find(|(f, _)| f == shared),
            None => self
                .hints
                .iter()
                .find(|(f, _)| f.share().is_none() && f.matches(&delivery.message.topic)),
        };
        found.map_or(StreamId::CONTROL, |(_, s)| *s)
    }

    fn deliver_now(&mut self, now: Instant, delivery: Delivery) {
        if delivery.qos == QoS::AtMostOnce && self.outputs.len() >= QOS0_DROP_AT {
            self.inner.metrics.messages_dropped.inc();
            return;
        }
        // Asked of the hooks for every message, and of the ACL as loaded now (it may have
        // been reloaded since the client connected).
        if let Who::Client(client) = &self.who {
            if !self
                .inner
                .authorize(client, Action::Receive, &delivery.message.topic)
            {
                self.discard(&delivery);
                return;
            }
        }
        let stream = self.stream_for(&delivery);
        let stored = delivery.store_seq.is_some().then(|| delivery.clone());
        let outcome = self.conn.deliver_on(now, stream, delivery);
        if !matches!(outcome, Enqueued::Sent | Enqueued::Queued) {
            self.inner.metrics.messages_dropped.inc();
            if let Some(d) = stored {
                self.discard(&d);
            }
        }
    }

    /// Forgets a stored delivery that will not be delivered.
    fn discard(&self, delivery: &Delivery) {
        if let Some(handle) = &self.handle {
            // Nothing is sent that depends on forgetting it: the client acknowledged the
            // message, or never gets it.
            let _ = self.inner.discard(&handle.client_id, delivery);
        }
    }

    /// Handles the protocol core's events until one needs a request.
    fn process_events(&mut self, now: Instant) {
        while !self.is_waiting() {
            let Some((stream, event)) = self.conn.poll_event_tagged() else {
                return;
            };
            match event {
                Event::Connect(request) => self.on_connect(now, request),
                Event::AuthContinue { data } => self.on_auth_continue(now, data),
                Event::ReAuthenticate { data } => self.on_reauthenticate(now, data),
                Event::Publish(publish) => self.on_publish(now, stream, publish),
                Event::Subscribe(subscribe) => self.on_subscribe(now, stream, subscribe),
                Event::Unsubscribe(unsubscribe) => self.on_unsubscribe(stream, unsubscribe),
                Event::Delivered { delivery, .. } => self.discard(&delivery),
                Event::Sent {
                    packet_id,
                    store_seq,
                } => self.flow_moved(store_seq, packet_id, OutboundState::PublishSent),
                Event::Released {
                    packet_id,
                    store_seq: Some(store_seq),
                } => self.flow_moved(store_seq, packet_id, OutboundState::ReleaseSent),
                Event::Released { .. } => {}
                Event::InboundReleased { packet_id } if self.persistent() => {
                    if let Some(id) = self.client_id() {
                        let ticket = self.inner.storage.pending_release(id, packet_id, false);
                        // PUBCOMP goes on the stream of the PUBREL.
                        self.depends_on_for(stream, ticket);
                    }
                }
                Event::InboundReleased { .. } => {}
                Event::Closed { reason, by_client } => {
                    self.closed_by_client = by_client;
                    self.close_reason = Some(reason);
                    if let Who::Client(client) = &self.who {
                        self.inner.metrics.clients_connected.dec();
                        self.inner.metrics.clients_over(client.peer.transport).dec();
                        info!(%reason, by_client, "client disconnected");
                        self.inner.hooks.on_disconnected(client, reason);
                    } else {
                        debug!(%reason, "connection closed before CONNACK");
                    }
                    if reason.is_error() && !by_client {
                        self.inner.metrics.protocol_errors.inc();
                    }
                }
                // Kinds of events added to the protocol core later.
                _ => {}
            }
        }
    }

    fn on_connect(&mut self, now: Instant, request: ConnectRequest) {
        let bridge_id = request
            .connect
            .client_id
            .as_str()
            .starts_with(LOCAL_CLIENT_PREFIX);
        if self.who.peer().transport == Transport::Bridge {
            // A bridge's own session: trusted, configured with the broker.
            return self.finish_connect(now, request, None);
        }
        if bridge_id {
            info!(client_id = %request.connect.client_id.as_str(), "client identifier reserved for bridges");
            let _ = self.conn.reject(now, ReasonCode::ClientIdentifierNotValid);
            return;
        }
        if let Some(identity) = self.certificate_username() {
            return self.connect_with_certificate(now, request, identity);
        }
        let connect = &request.connect;
        if let Some(method) = &connect.properties.authentication_method {
            let data = connect
                .properties
                .authentication_data
                .clone()
                .unwrap_or_default();
            match self.start_scram(method, &data) {
                Ok((state, server_first)) => {
                    self.rare().scram = Some(Box::new(PendingScram {
                        state,
                        connect: Some(request),
                    }));
                    let _ = self.conn.auth_continue(Some(server_first.into()));
                }
                Err(reason) => self.refuse(now, reason),
            }
            return;
        }
        if connect.username.is_some() && self.inner.auth.load().passwords.is_some() {
            self.rare().request = Some(Request::CheckPassword(Box::new(PasswordCheck {
                client_id: connect.client_id.clone(),
                username: connect.username.clone(),
                password: connect.password.clone(),
                version: connect.protocol,
                peer: self.who.peer().clone(),
            })));
            self.rare().waiting = Some(Waiting::Password(request));
            return;
        }
        let verdict = self.inner.authenticate(&ConnectAttempt {
            client_id: &connect.client_id,
            username: connect.username.as_ref(),
            password: connect.password.as_ref(),
            version: connect.protocol,
            peer: self.who.peer(),
        });
        match verdict {
            Ok(()) => self.finish_connect(now, request, None),
            Err(reason) => {
                info!(%reason, username = ?connect.username, "authentication failed");
                self.refuse(now, reason);
            }
        }
    }

    /// With `tls.use_identity_as_username`, on a transport with TLS: the user name the client
    /// certificate gives (`None` without one), which replaces the CONNECT's; likewise the
    /// peer's node id on `p2p://` with `p2p.use_node_id_as_username`. `None` otherwise.
    fn certificate_username(&self) -> Option<CertificateUser> {
        let config = &self.inner.config;
        let enabled = match self.who.peer().transport {
            Transport::P2p => self.inner.node_id_as_username.load(Ordering::Relaxed),
            transport => config.tls.use_identity_as_username && transport.is_secure(),
        };
        if !enabled {
            return None;
        }
        Some(match &self.who.peer().tls_identity {
            Some(identity) => match MqttStr::try_from(&**identity) {
                Ok(user) => CertificateUser::Named(user),
                Err(_) => CertificateUser::Invalid,
            },
            None => CertificateUser::Anonymous,
        })
    }

    /// Authenticates a CONNECT by its client certificate (Mosquitto's
    /// `use_identity_as_username`): the verified certificate is the credential, so the
    /// CONNECT's user name and password are ignored and no password is checked; the hooks
    /// still have their say. A client without a certificate has no user name: it is anonymous.
    fn connect_with_certificate(
        &mut self,
        now: Instant,
        request: ConnectRequest,
        identity: CertificateUser,
    ) {
        let connect = &request.connect;
        let verdict = match (&identity, &connect.properties.authentication_method) {
            (CertificateUser::Invalid, _) => {
                info!(identity = ?self.who.peer().tls_identity, "certificate identity is not a valid user name");
                Err(ReasonCode::NotAuthorized)
            }
            // The certificate is the credential; no second method on top of it.
            (_, Some(_)) => Err(ReasonCode::BadAuthenticationMethod),
            (CertificateUser::Named(user), None) => {
                let attempt = ConnectAttempt {
                    client_id: &connect.client_id,
                    username: Some(user),
                    password: None,
                    version: connect.protocol,
                    peer: self.who.peer(),
                };
                match self.inner.hooks.authenticate(&attempt) {
                    Verdict::Allow | Verdict::Defer => Ok(()),
                    Verdict::Deny(reason) => Err(reason),
                }
            }
            (CertificateUser::Anonymous, None) => self.inner.authenticate(&ConnectAttempt {
                client_id: &connect.client_id,
                username: None,
                password: None,
                version: connect.protocol,
                peer: self.who.peer(),
            }),
        };
        match verdict {
            Ok(()) => self.finish_connect(now, request, None),
            Err(reason) => {
                info!(%reason, identity = ?self.who.peer().tls_identity, "authentication by certificate failed");
                self.refuse(now, reason);
            }
        }
    }

    fn refuse(&mut self, now: Instant, reason: ReasonCode) {
        self.inner.metrics.auth_failures.inc();
        let _ = self.conn.reject(now, reason);
    }

    /// Starts SCRAM-SHA-256, the enhanced authentication method the broker offers, against the
    /// password file.
    fn start_scram(
        &self,
        method: &MqttStr,
        client_first: &[u8],
    ) -> Result<(ScramServerFirstSent, Vec<u8>), ReasonCode> {
        let access = self.inner.auth.load();
        let Some(passwords) = access
            .passwords
            .as_ref()
            .filter(|_| method.as_str() == MECHANISM)
        else {
            return Err(ReasonCode::BadAuthenticationMethod);
        };
        self.inner
            .scram
            .start(client_first, |user| {
                passwords.scram_credentials(user).cloned()
            })
            .map_err(|e| e.reason_code())
    }

    fn on_auth_continue(&mut self, now: Instant, data: Option<Bytes>) {
        let Some(pending) = self.rare.as_mut().and_then(|r| r.scram.take()) else {
            return self.refuse(now, ReasonCode::ProtocolError);
        };
        let user = MqttStr::try_from(pending.state.username()).ok();
        let reauthenticating = pending.connect.is_none();
        match pending.state.finish(data.as_deref().unwrap_or_default()) {
            Ok(server_final) => {
                self.scram_user = user.map(Box::new);
                match pending.connect {
                    Some(request) => self.finish_connect(now, request, Some(server_final.into())),
                    None => {
                        if let (Who::Client(client), Some(user)) = (&mut self.who, &self.scram_user)
                        {
                            Arc::make_mut(client).username = Some(MqttStr::clone(user));
                        }
                        let _ = self.conn.reauth_success(Some(server_final.into()));
                    }
                }
            }
            Err(error) => {
                info!(%error, "SCRAM authentication failed");
                let reason = match error.reason_code() {
                    // A failed re-authentication is refused with DISCONNECT, which has no 0x86
                    // (it would go out as 0x80 Unspecified error): the client is no longer
                    // authorized, so say that.
                    ReasonCode::BadUserNameOrPassword if reauthenticating => {
                        ReasonCode::NotAuthorized
                    }
                    reason => reason,
                };
                self.refuse(now, reason);
            }
        }
    }

    fn on_reauthenticate(&mut self, now: Instant, data: Option<Bytes>) {
        if self.certificate_username().is_some() {
            // The certificate names the user; SCRAM must not rename it.
            return self.refuse(now, ReasonCode::BadAuthenticationMethod);
        }
        let method = MqttStr::from_static(MECHANISM).unwrap_or_default();
        match self.start_scram(&method, data.as_deref().unwrap_or_default()) {
            Ok((state, server_first)) => {
                self.rare().scram = Some(Box::new(PendingScram {
                    state,
                    connect: None,
                }));
                let _ = self.conn.auth_continue(Some(server_first.into()));
            }
            Err(reason) => self.refuse(now, reason),
        }
    }

    /// Goes on with an authenticated CONNECT: checks its will, then asks for the session.
    fn finish_connect(&mut self, now: Instant, request: ConnectRequest, auth_data: Option<Bytes>) {
        let connect = &request.connect;
        let assigned = connect
            .client_id
            .is_empty()
            .then(|| self.inner.assign_client_id());
        let client_id = assigned
            .clone()
            .unwrap_or_else(|| connect.client_id.clone());
        tracing::Span::current().record("client_id", client_id.as_str());
        let username = match self.certificate_username() {
            Some(CertificateUser::Named(user)) => Some(user),
            Some(CertificateUser::Anonymous | CertificateUser::Invalid) => None,
            None => self
                .scram_user
                .as_deref()
                .cloned()
                // Its own copy: kept as long as the connection, it would keep the CONNECT
                // packet it is a slice of.
                .or_else(|| connect.username.as_ref().map(MqttStr::detached)),
        };
        let client = ClientInfo {
            client_id,
            username,
            version: connect.protocol,
            peer: self.who.peer().clone(),
        };
        // The will is published on the client's behalf: refuse the CONNECT (as Mosquitto does)
        // rather than let it reach a topic the client may not publish to. Checked before the
        // session is touched, so a refused client cannot take over an existing one.
        if let Some(will) = &connect.will {
            if !self.topic_within_limits(will.topic.as_str()) {
                info!(topic = %will.topic.as_str(), "will topic beyond the topic limits");
                return self.refuse(now, ReasonCode::TopicNameInvalid);
            }
            if !self
                .inner
                .authorize(&client, Action::Publish, will.topic.as_str())
            {
                info!(topic = %will.topic.as_str(), "will topic not authorized");
                return self.refuse(now, ReasonCode::NotAuthorized);
            }
        }
        // A CONNECT that would add a persistent session takes a place under `max_sessions`
        // first. Resuming or replacing one counted already adds none; a bridge's own session is
        // configured with the broker and always gets one.
        let adds_session = request.session_expiry_interval > 0
            && self.who.peer().transport != Transport::Bridge
            && !self
                .inner
                .sessions
                .get(&client.client_id)
                .is_some_and(|h| h.counted.load(Ordering::Relaxed));
        let permit = if adds_session {
            let Some(permit) = self.inner.persistent_sessions.permit() else {
                // debug: a client creating sessions without end would fill the log.
                debug!(
                    max_sessions = self.inner.persistent_sessions.max(),
                    "persistent session refused: max_sessions reached"
                );
                self.inner.metrics.limit_refused("sessions", 1);
                // MQTT 3.1.1 has no such code: 0x03, server unavailable.
                let _ = self.conn.reject(now, ReasonCode::QuotaExceeded);
                return;
            };
            Some(permit)
        } else {
            None
        };
        self.rare().request = Some(Request::AcquireSession(Box::new(SessionRequest {
            client_id: client.client_id.clone(),
            clean_start: connect.clean_start,
            expiry: request.session_expiry_interval,
        })));
        self.rare().waiting = Some(Waiting::Session(Box::new(Connecting {
            request,
            client,
            assigned,
            auth_data,
            permit,
        })));
    }

    /// Routes a message and acknowledges it; if that stored anything, the acknowledgement
    /// waits in the output until it is durable (persist, then acknowledge). A publication
    /// that finds subscribers without room waits for it, with its stream's reading paused:
    /// the copies of a QoS 0 or 1 one that found no room, a QoS 2 one whole, before anything
    /// of it is routed (see [`Held`]).
    fn on_publish(&mut self, now: Instant, stream: StreamId, publish: InboundPublish) {
        if let Some(b) = self.blocked.iter_mut().find(|b| b.stream == stream) {
            b.later.push_back(publish);
            return;
        }
        self.inner.metrics.messages_received.inc();
        ConnStats::add(&self.mailbox.stats.messages_in, 1);
        let InboundPublish {
            mut message,
            packet_id,
            ..
        } = publish;
        if let Err(reason) = self.admit(&mut message) {
            self.inner.metrics.messages_dropped.inc();
            debug!(%reason, topic = %message.topic, "publish refused");
            if let Some(id) = packet_id {
                let _ = self.conn.publish_ack(id, reason);
            }
            return;
        }
        let message = Arc::new(message);
        // A QoS 2 publication's room check and its routing use the same matches, found once.
        let tree = (message.qos == QoS::ExactlyOnce).then(|| self.inner.subscriptions());
        let key = self.handle.as_ref().map(|h| h.key);
        let matches = tree.as_deref().map(|t| Matches::find(t, &message, key));
        let waits = match &matches {
            Some(matches) => self.inner.lacking_room_in(&message, matches),
            None => Waits::new(),
        };
        let (reason, held) = if waits.is_empty() {
            let mut blocked = Blocked::new();
            let reason = self.route_publication(
                now,
                stream,
                &message,
                packet_id,
                matches.as_ref(),
                &mut blocked,
            );
            (reason, Held::Copies(blocked))
        } else {
            // Acknowledged with the reason found when it is routed.
            (ReasonCode::Success, Held::Whole { message, waits })
        };
        if held.is_empty() {
            if let Some(id) = packet_id {
                let _ = self.conn.publish_ack(id, reason);
            }
        } else {
            self.blocked.push(BlockedPublish {
                stream,
                packet_id,
                reason,
                progress: held.progress(),
                held,
                since: now,
                tried: now,
                later: VecDeque::new(),
            });
        }
    }

    /// Routes an admitted message in one atomic write with what else it changes (a retained
    /// message, a QoS 2 publisher's PUBREL state), which `stream`'s output then waits for.
    /// QoS 0 and 1 copies that find no room are handed back in `blocked`; a QoS 2 message is
    /// routed whole, to `matches` if its room check just found them. Returns the reason code
    /// to acknowledge it with.
    fn route_publication(
        &mut self,
        now: Instant,
        stream: StreamId,
        message: &Arc<Message>,
        packet_id: Option<PacketId>,
        matches: Option<&Matches<'_>>,
        blocked: &mut Blocked,
    ) -> ReasonCode {
        let inner = &*self.inner;
        // Nothing to wait for after a QoS 0 one but a retained message, written on its own.
        let mut batch = if inner.durable && message.qos != QoS::AtMostOnce {
            inner.storage.batch()
        } else {
            Batch::direct(&*inner.storage)
        };
        if message.retain {
            if let Err(refused) = inner.retain(message, &mut batch) {
                inner.metrics.limit_refused(refused.label(), 1);
                debug!(topic = %message.topic, limit = refused.label(), "retained message refused");
                // An MQTT 5 client is told (PUBACK or PUBREC 0x97) and nothing is done: it may
                // publish again without the flag. QoS 0, and MQTT 3 whose acknowledgements
                // cannot refuse, are delivered without being retained.
                let v5 = self.conn.version().is_some_and(ProtocolVersion::is_v5);
                if v5 && message.qos != QoS::AtMostOnce {
                    inner.metrics.messages_dropped.inc();
                    // The batch recorded nothing: discarded, it holds nothing back.
                    return ReasonCode::QuotaExceeded;
                }
            }
        }
        let key = self.handle.as_ref().map(|h| h.key);
        let routed = if message.qos == QoS::ExactlyOnce {
            inner.route_whole(now, message, key, matches, &mut batch)
        } else {
            inner.route_or_block(now, message, key, blocked, &mut batch)
        };
        inner.publish_to_cluster(
            message,
            self.handle.as_ref().map(|h| &h.client_id),
            &mut batch,
        );
        if message.qos == QoS::ExactlyOnce && self.persistent() {
            if let (Some(handle), Some(packet_id)) = (&self.handle, packet_id) {
                // The batch's ticket covers it.
                let _ = batch.pending_release(&handle.client_id, packet_id, true);
                let _ = update_flag(&handle.stored_messages, true);
            }
        }
        let ticket = batch.commit();
        let routed = routed > 0 || inner.cluster_subscribed(message);
        self.depends_on_for(stream, ticket);
        if !routed {
            ReasonCode::NoMatchingSubscribers
        } else {
            ReasonCode::Success
        }
    }

    /// Whether the session outlives the connection.
    fn persistent(&self) -> bool {
        self.conn.session().is_some_and(|s| s.expiry_interval() > 0)
    }

    /// Records where a stored QoS 2 message's flow stands.
    fn flow_moved(&mut self, store_seq: u64, packet_id: PacketId, state: OutboundState) {
        if let Some(id) = self.client_id() {
            let ticket = self
                .inner
                .storage
                .delivery_flow(id, store_seq, packet_id, state);
            self.depends_on(ticket);
        }
    }

    /// Whether a topic name is within `max_topic_length` and `max_topic_levels`.
    fn topic_within_limits(&self, topic: &str) -> bool {
        let limits = self.inner.limits.load();
        topic.len() <= limits.max_topic_length
            && topic.split('/').count() <= limits.max_topic_levels
    }

    /// Checks a published message against limits, ACL and hooks.
    fn admit(&self, message: &mut Message) -> Result<(), ReasonCode> {
        let topic = message.topic.as_str();
        if !self.topic_within_limits(topic) {
            return Err(ReasonCode::TopicNameInvalid);
        }
        let Who::Client(client) = &self.who else {
            return Err(ReasonCode::NotAuthorized);
        };
        if !self.inner.authorize(client, Action::Publish, topic) {
            return Err(ReasonCode::NotAuthorized);
        }
        match self.inner.hooks.on_publish(client, message) {
            Intercept::Continue => Ok(()),
            Intercept::Drop(reason) => Err(reason),
        }
    }

    /// Remembers which stream a subscription's messages go on: a data stream's, or the
    /// control stream (no hint).
    fn hint(&mut self, filter: &TopicFilter, stream: StreamId) {
        self.hints.retain(|(f, _)| f != filter);
        if !stream.is_control() {
            self.hints.push((filter.clone(), stream));
        }
    }

    fn on_subscribe(&mut self, now: Instant, stream: StreamId, subscribe: Subscribe) {
        let (Some(handle), Some(client)) = (self.handle.clone(), self.who.client()) else {
            return;
        };
        let max_qos = self.inner.server_config.maximum_qos;
        let id = subscribe.properties.subscription_identifier;
        let mut reasons = Vec::with_capacity(subscribe.filters.len());
        let mut adds = Vec::new();
        let limits = self.inner.limits.load();
        let max_subscriptions = limits.max_subscriptions;
        for sub in &subscribe.filters {
            let filter = &sub.filter;
            let text = filter.as_str();
            let reason = if text.len() > limits.max_topic_length
                || filter.pattern().split('/').count() > limits.max_topic_levels
            {
                ReasonCode::TopicFilterInvalid
            } else if max_subscriptions > 0
                && handle.subscriptions.lock().len() + adds.len() >= max_subscriptions
                && !handle.subscriptions.lock().contains_key(filter)
            {
                ReasonCode::QuotaExceeded
            } else if !self.inner.authorize(client, Action::Subscribe, text) {
                ReasonCode::NotAuthorized
            } else {
                let mut options = sub.options;
                options.qos = options.qos.min(max_qos);
                let shared = filter.share().is_some().then(|| filter.clone());
                let subscriber = Subscriber {
                    handle: handle.clone(),
                    options,
                    id,
                    shared,
                };
                adds.push((filter.clone(), subscriber));
                Inner::granted(options.qos)
            };
            reasons.push(reason);
        }
        // Counted once per SUBSCRIBE: a client past its limit may send many.
        let over = reasons
            .iter()
            .filter(|r| **r == ReasonCode::QuotaExceeded)
            .count();
        self.inner
            .metrics
            .limit_refused("subscriptions", over as u64);
        for (filter, _) in &adds {
            self.hint(filter, stream);
        }
        let existed = self.inner.subscribe(&adds);
        let mut retained = Vec::new();
        {
            let mut subs = handle.subscriptions.lock();
            for ((filter, sub), existed) in adds.iter().zip(existed) {
                subs.insert(filter.clone(), (sub.options, sub.id));
                use mqttd_proto::RetainHandling::*;
                let send = match sub.options.retain_handling {
                    SendAtSubscribe => true,
                    SendIfNew => !existed,
                    DoNotSend => false,
                };
                // Shared subscriptions get no retained messages [MQTT-3.8.4-?; 4.8.2].
                if send && filter.share().is_none() {
                    retained.push((filter.clone(), sub.options, sub.id));
                }
            }
        }
        let _ = self.conn.subscribe_ack(subscribe.packet_id, reasons);
        self.save_session(stream);
        if !retained.is_empty() {
            // Snapshots of the store, read as the client makes room.
            let feed = self.retained.get_or_insert_with(Box::default);
            for (filter, options, id) in retained {
                feed.cursors
                    .push_back((self.inner.retained.cursor(&filter), options, id));
            }
            self.feed_retained(now);
        }
    }

    fn on_unsubscribe(&mut self, stream: StreamId, unsubscribe: Unsubscribe) {
        let Some(handle) = self.handle.clone() else {
            return;
        };
        let existed = self.inner.unsubscribe_all(handle.key, &unsubscribe.filters);
        {
            let mut subs = handle.subscriptions.lock();
            for f in &unsubscribe.filters {
                subs.remove(f);
            }
        }
        for f in &unsubscribe.filters {
            self.hint(f, StreamId::CONTROL);
        }
        let reasons = existed
            .into_iter()
            .map(|e| {
                if e {
                    ReasonCode::Success
                } else {
                    ReasonCode::NoSubscriptionExisted
                }
            })
            .collect();
        let _ = self.conn.unsubscribe_ack(unsubscribe.packet_id, reasons);
        self.save_session(stream);
    }

    /// Records the session in storage if it is persistent or has a will; what the client
    /// is told next on `stream` waits until that is durable.
    fn save_session(&mut self, stream: StreamId) {
        if let (Some(handle), Some(session)) = (&self.handle, self.conn.session()) {
            let will = self.will.as_deref().cloned();
            let ticket = self
                .inner
                .save_session(handle, session.expiry_interval(), will, None);
            self.depends_on_for(stream, ticket);
        }
    }

    /// See [`Self::finish`].
    fn hand_off_session(&mut self, now: Instant, wall: SystemTime) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        // Publishers waiting for room in this session's queue stop waiting for this
        // connection: the queue now fills offline, under the offline rules.
        handle.set_saturated(false);
        handle.set_congested(false);
        handle.capacity.store(usize::MAX, Ordering::Relaxed);
        let mut session = self
            .conn
            .take_session()
            .or_else(|| self.rare.as_mut()?.unaccepted.take().map(|s| *s));
        // Stored messages that waited for their changes to be durable go first, in order;
        // they enter the session's queue once it is known where the session goes next.
        let mut waiting: Vec<Delivery> = self
            .awaiting
            .take()
            .map(|a| a.batches)
            .unwrap_or_default()
            .into_iter()
            .flat_map(|(_, batch)| batch)
            .chain(
                self.retained
                    .take()
                    .into_iter()
                    .flat_map(|f| f.next.into_iter().chain(f.deferred)),
            )
            .collect();
        let mailbox = self.mailbox.clone();
        let drain = |waiting: &mut Vec<Delivery>, takeover: &mut Option<_>| {
            let inbox = mailbox.take();
            if let Some(reply) = inbox.takeover {
                *takeover = Some(reply);
            }
            waiting.extend(inbox.deliveries);
        };
        let id = handle.client_id.clone();
        if self
            .rare
            .as_ref()
            .is_none_or(|r| r.takeover_reply.is_none())
        {
            let mut slot = handle.slot.lock();
            let ours =
                matches!(&*slot, Slot::Online { mailbox } if Arc::ptr_eq(mailbox, &self.mailbox));
            if ours {
                drain(&mut waiting, &mut self.rare().takeover_reply);
                *slot = Slot::Transferring {
                    buffer: Vec::new(),
                    from: None,
                };
                drop(slot);
                self.inner.keep_or_end(now, wall, &handle, session, waiting);
                return;
            }
            // Another connection is taking the session over; its request is in the mailbox.
        }
        drain(&mut waiting, &mut self.rare().takeover_reply);
        self.inner
            .enqueue_all(now, &id, session.as_mut(), waiting, Headed::Online);
        if let Some(reply) = self.rare.as_mut().and_then(|r| r.takeover_reply.take()) {
            if let Err(session) = reply.send(session) {
                // The connection that asked gave up waiting (this one answered late: its
                // process was paused, or it was stuck writing): the session stays, kept as
                // if nobody had asked, unless it ended meanwhile.
                let moving = matches!(*handle.slot.lock(), Slot::Transferring { .. })
                    && self
                        .inner
                        .sessions
                        .get(&id)
                        .is_some_and(|h| Arc::ptr_eq(&h, &handle));
                if moving {
                    debug!("session kept: the connection taking it over stopped waiting");
                    self.inner
                        .keep_or_end(now, wall, &handle, *session, Vec::new());
                }
            }
        }
    }
}
