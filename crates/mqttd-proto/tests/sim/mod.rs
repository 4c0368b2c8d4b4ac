//! A deterministic simulation of MQTT clients and a broker, in the spirit of quinn-proto's
//! `Pair` (`src/tests/util.rs`): the protocol machines of both roles run against a virtual clock
//! that only the harness moves, and talk over simulated links that carry **bytes**.
//!
//! # Pieces
//!
//! - [`Sim`] owns the clock, the [`Broker`], the clients and the links.
//! - [`Broker`] is a small stand-in for the real broker: it owns one [`ServerConnection`] per
//!   link and the stored [`Session`]s by client identifier. It answers CONNECT (resume, clean
//!   start, takeover, assigned identifiers, configured refusals, enhanced authentication through
//!   an [`AuthMethod`]), routes PUBLISH to matching subscriptions or into the stored sessions of
//!   offline clients and only then acknowledges it (persist, then acknowledge), answers
//!   SUBSCRIBE/UNSUBSCRIBE, takes sessions back when connections close and drives the stored
//!   sessions' timers (delayed wills, expiry).
//! - A client is a [`ClientConnection`] plus an application-side inbox of every event it
//!   reported, across reconnects.
//! - A link carries encoded packets with a one-way latency; the receiving side cuts the byte
//!   stream with [`PacketReader`], so every packet goes through the codec. A link can be cut
//!   (both ends learn at once, bytes in flight are lost), either by a test or by a [`Trigger`]
//!   that fires when a given packet reaches its receiver; one direction can be stalled (bytes
//!   are held, not delivered), which is how a peer "goes silent".
//!
//! # Time
//!
//! [`Sim::drive`] delivers everything in flight, firing every timer that falls due on the way,
//! and stops as soon as nothing is in flight: timers further out (keep alive, will delay,
//! session expiry) only fire under [`Sim::advance`], which moves the clock to the next due
//! timer or arrival, in order, up to a target time. Nothing reads the system clock after
//! [`Sim::new`], so every run is the same.

use std::collections::{BTreeMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use mqttd_proto::client::{self, ClientConfig, ClientConnection};
use mqttd_proto::codec::PacketReader;
use mqttd_proto::server::{self, Accept, ConnectRequest, ServerConfig, ServerConnection};
use mqttd_proto::session::{Enqueued, QueueLimits, Session, SessionEvent};
use mqttd_proto::{
    ClientId, Delivery, Message, Packet, PacketId, PacketType, ProtocolVersion, QoS, ReasonCode,
    Subscription, SubscriptionOptions, TopicFilter, TopicName, Unsubscribe,
};

/// One-way latency of new links unless a test sets another.
pub(crate) const LATENCY: Duration = Duration::from_millis(10);

/// Steps allowed at one instant before the harness declares a livelock (a timer that stays due
/// after firing, or two machines answering each other forever).
const MAX_STEPS_PER_INSTANT: usize = 10_000;

/// A direction on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// From the client to the broker.
    ToServer,
    /// From the broker to the client.
    ToClient,
}

/// Where a [`Trigger`] cuts the link relative to the packet it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// The packet is lost with the link.
    Before,
    /// The receiver handles the packet, then the link fails: whatever it answers is lost.
    After,
}

/// Cuts a client's link when a packet of `kind` travelling `dir` reaches its receiver, after
/// letting `skip` such packets through. Counts run across the client's reconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Trigger {
    pub(crate) dir: Dir,
    pub(crate) kind: PacketType,
    pub(crate) skip: usize,
    pub(crate) cut: Cut,
}

/// A packet seen on a link.
#[derive(Debug, Clone)]
pub(crate) struct WireRecord {
    pub(crate) at: Instant,
    pub(crate) client: ClientRef,
    pub(crate) dir: Dir,
    /// True when recorded as the sender wrote it, false when decoded by the receiver.
    pub(crate) sent: bool,
    pub(crate) packet: Packet,
}

/// A client of the simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ClientRef(usize);

/// A pluggable enhanced authentication method.
pub(crate) trait AuthMethod {
    /// The challenge answering a client's initial data, or the reason to refuse it.
    fn challenge(
        &mut self,
        client: &ClientId,
        initial: Option<&Bytes>,
    ) -> Result<Bytes, ReasonCode>;
    /// Whether `response` answers `challenge`.
    fn verify(&mut self, challenge: &Bytes, response: Option<&Bytes>) -> bool;
}

/// A toy challenge/response method, "TOY": the server sends a fresh nonce, and the client must
/// answer with the nonce reversed. [`toy_answer`] computes the right answer.
#[derive(Debug, Default)]
pub(crate) struct Toy {
    nonces: u32,
}

/// The name of the [`Toy`] method.
pub(crate) const TOY: &str = "TOY";

impl AuthMethod for Toy {
    fn challenge(&mut self, _: &ClientId, initial: Option<&Bytes>) -> Result<Bytes, ReasonCode> {
        if initial.is_some_and(|d| d.as_ref() != b"hello") {
            return Err(ReasonCode::BadUserNameOrPassword);
        }
        self.nonces += 1;
        Ok(Bytes::from(format!("nonce-{}", self.nonces)))
    }

    fn verify(&mut self, challenge: &Bytes, response: Option<&Bytes>) -> bool {
        response.is_some_and(|r| *r == toy_answer(challenge))
    }
}

/// How a client's application answers an authentication challenge.
pub(crate) type AuthAnswer = fn(&[u8]) -> Bytes;

/// The right answer to a [`Toy`] challenge.
pub(crate) fn toy_answer(challenge: &[u8]) -> Bytes {
    challenge.iter().rev().copied().collect::<Vec<u8>>().into()
}

/// Something the broker did that tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BrokerLog {
    /// A CONNECT was accepted.
    Accepted {
        client: ClientId,
        session_present: bool,
    },
    /// A CONNECT or re-authentication was refused.
    Refused { reason: ReasonCode },
    /// A connection closed.
    Closed {
        client: Option<ClientId>,
        reason: ReasonCode,
        by_client: bool,
    },
    /// A will was published.
    Will {
        client: ClientId,
        message: Box<Message>,
    },
    /// A stored session expired.
    Expired { client: ClientId },
}

#[derive(Debug, Clone)]
struct Sub {
    filter: TopicFilter,
    options: SubscriptionOptions,
    id: Option<NonZeroU32>,
}

/// A CONNECT waiting for its authentication exchange to finish.
#[derive(Debug, Clone)]
struct PendingConnect {
    client: ClientId,
    assigned: bool,
    clean_start: bool,
    expiry: u32,
    challenge: Bytes,
}

struct ServerSide {
    conn: ServerConnection,
    link: Option<usize>,
    /// The enhanced authentication method the client connected with.
    method: Option<String>,
    pending: Option<PendingConnect>,
    reauth_challenge: Option<Bytes>,
}

/// The broker stand-in.
pub(crate) struct Broker {
    pub(crate) config: ServerConfig,
    /// Queue limits of new sessions.
    pub(crate) session_limits: QueueLimits,
    /// Client identifiers refused at CONNECT, and with what.
    pub(crate) refuse: BTreeMap<ClientId, ReasonCode>,
    /// Enhanced authentication methods by name.
    pub(crate) auth: BTreeMap<String, Box<dyn AuthMethod>>,
    /// Withhold PUBACK/PUBREC for incoming messages until [`Sim::release_acks`].
    pub(crate) hold_acks: bool,
    pub(crate) log: Vec<(Instant, BrokerLog)>,
    conns: Vec<ServerSide>,
    online: BTreeMap<ClientId, usize>,
    sessions: BTreeMap<ClientId, Session>,
    subscriptions: BTreeMap<ClientId, Vec<Sub>>,
    held: Vec<(usize, PacketId, ReasonCode)>,
    assigned: u32,
}

impl Broker {
    fn new(config: ServerConfig) -> Self {
        let mut auth: BTreeMap<String, Box<dyn AuthMethod>> = BTreeMap::new();
        auth.insert(TOY.into(), Box::new(Toy::default()));
        Self {
            config,
            session_limits: QueueLimits::default(),
            refuse: BTreeMap::new(),
            auth,
            hold_acks: false,
            log: Vec::new(),
            conns: Vec::new(),
            online: BTreeMap::new(),
            sessions: BTreeMap::new(),
            subscriptions: BTreeMap::new(),
            held: Vec::new(),
            assigned: 0,
        }
    }

    /// The stored (offline) session of `client`.
    pub(crate) fn stored_session(&self, client: &str) -> Option<&Session> {
        self.sessions.get(&cid(client))
    }

    /// Whether `client` has a connected connection.
    pub(crate) fn is_online(&self, client: &str) -> bool {
        self.online
            .get(&cid(client))
            .is_some_and(|&i| self.conns[i].conn.is_connected())
    }

    /// Wills published so far: (time, client, message).
    pub(crate) fn wills(&self) -> Vec<(Instant, ClientId, Message)> {
        self.log
            .iter()
            .filter_map(|(at, l)| match l {
                BrokerLog::Will { client, message } => {
                    Some((*at, client.clone(), (**message).clone()))
                }
                _ => None,
            })
            .collect()
    }

    fn timeout(&self) -> Option<Instant> {
        let conns = self.conns.iter().filter_map(|s| s.conn.poll_timeout());
        let sessions = self.sessions.values().filter_map(Session::poll_timeout);
        conns.chain(sessions).min()
    }

    fn fire_timers(&mut self, now: Instant) -> bool {
        let mut fired = false;
        for side in &mut self.conns {
            if side.conn.poll_timeout().is_some_and(|t| t <= now) {
                side.conn.handle_timeout(now);
                fired = true;
            }
        }
        let due: Vec<ClientId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.poll_timeout().is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            fired = true;
            self.fire_session_timer(now, &id);
        }
        fired
    }

    /// Runs the stored session's timer if it is due: publishes a will whose delay passed, or
    /// drops an expired session (publishing its will).
    fn fire_session_timer(&mut self, now: Instant, id: &ClientId) {
        let Some(session) = self.sessions.get_mut(id) else {
            return;
        };
        match session.handle_timeout(now) {
            Some(SessionEvent::WillDue(message)) => self.publish_will(now, id, message),
            Some(SessionEvent::Expired { will }) => {
                self.sessions.remove(id);
                self.subscriptions.remove(id);
                self.log
                    .push((now, BrokerLog::Expired { client: id.clone() }));
                if let Some(message) = will {
                    self.publish_will(now, id, message);
                }
            }
            None => {}
        }
    }

    fn publish_will(&mut self, now: Instant, client: &ClientId, message: Message) {
        self.log.push((
            now,
            BrokerLog::Will {
                client: client.clone(),
                message: Box::new(message.clone()),
            },
        ));
        self.route(now, None, Arc::new(message));
    }

    /// Drains the events of connection `i`. Returns whether there were any.
    fn drain_events(&mut self, now: Instant, i: usize) -> bool {
        let mut any = false;
        while let Some(event) = self.conns[i].conn.poll_event() {
            any = true;
            self.handle_event(now, i, event);
        }
        any
    }

    fn handle_event(&mut self, now: Instant, i: usize, event: server::Event) {
        match event {
            server::Event::Connect(request) => self.on_connect(now, i, request),
            server::Event::AuthContinue { data } => self.on_auth_continue(now, i, data),
            server::Event::ReAuthenticate { data } => self.on_reauthenticate(now, i, data),
            server::Event::Publish(publish) => {
                let from = self.conns[i].conn.client_id().cloned();
                let matched = self.route(now, from.as_ref(), Arc::new(publish.message));
                if let Some(id) = publish.packet_id {
                    let reason = if matched == 0 {
                        ReasonCode::NoMatchingSubscribers
                    } else {
                        ReasonCode::Success
                    };
                    if self.hold_acks {
                        self.held.push((i, id, reason));
                    } else {
                        // The connection may have closed since; then nothing can be answered.
                        let _ = self.conns[i].conn.publish_ack(id, reason);
                    }
                }
            }
            server::Event::Subscribe(subscribe) => {
                let Some(client) = self.conns[i].conn.client_id().cloned() else {
                    return;
                };
                let subs = self.subscriptions.entry(client).or_default();
                let mut reasons = Vec::new();
                for Subscription { filter, options } in subscribe.filters {
                    let qos = options.qos.min(self.config.maximum_qos);
                    let sub = Sub {
                        filter,
                        options: SubscriptionOptions { qos, ..options },
                        id: subscribe.properties.subscription_identifier,
                    };
                    match subs.iter_mut().find(|s| s.filter == sub.filter) {
                        Some(existing) => *existing = sub,
                        None => subs.push(sub),
                    }
                    reasons.push(match qos {
                        QoS::AtMostOnce => ReasonCode::Success,
                        QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                        QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
                    });
                }
                let _ = self.conns[i]
                    .conn
                    .subscribe_ack(subscribe.packet_id, reasons);
            }
            server::Event::Unsubscribe(Unsubscribe {
                packet_id, filters, ..
            }) => {
                let Some(client) = self.conns[i].conn.client_id().cloned() else {
                    return;
                };
                let subs = self.subscriptions.entry(client).or_default();
                let reasons = filters
                    .iter()
                    .map(|f| {
                        let before = subs.len();
                        subs.retain(|s| s.filter != *f);
                        if subs.len() < before {
                            ReasonCode::Success
                        } else {
                            ReasonCode::NoSubscriptionExisted
                        }
                    })
                    .collect();
                let _ = self.conns[i].conn.unsubscribe_ack(packet_id, reasons);
            }
            server::Event::Delivered { .. }
            | server::Event::Released { .. }
            | server::Event::Sent { .. }
            | server::Event::InboundReleased { .. } => {}
            server::Event::Closed { reason, by_client } => {
                let session = self.conns[i].conn.take_session();
                let client = session.as_ref().map(|s| s.client_id().clone());
                if let Some(session) = session {
                    let id = session.client_id().clone();
                    if self.online.get(&id) == Some(&i) {
                        self.online.remove(&id);
                    }
                    self.sessions.insert(id, session);
                }
                self.log.push((
                    now,
                    BrokerLog::Closed {
                        client,
                        reason,
                        by_client,
                    },
                ));
            }
            // A new kind of event must be taught to the simulated broker.
            other => panic!("unhandled server event {other:?}"),
        }
    }

    fn refuse(&mut self, now: Instant, i: usize, reason: ReasonCode) {
        self.conns[i].pending = None;
        if self.conns[i].conn.is_closed() {
            // The link failed while the broker was deciding.
            return;
        }
        self.conns[i]
            .conn
            .reject(now, reason)
            .expect("a connection attempt or re-authentication is pending");
        self.log.push((now, BrokerLog::Refused { reason }));
    }

    fn on_connect(&mut self, now: Instant, i: usize, request: ConnectRequest) {
        if self.conns[i].conn.is_closed() {
            return;
        }
        let connect = &request.connect;
        let (client, assigned) = if connect.client_id.is_empty() {
            self.assigned += 1;
            (cid(&format!("auto-{}", self.assigned)), true)
        } else {
            (connect.client_id.clone(), false)
        };
        if let Some(&reason) = self.refuse.get(&client) {
            return self.refuse(now, i, reason);
        }
        let mut pending = PendingConnect {
            client,
            assigned,
            clean_start: connect.clean_start,
            expiry: request.session_expiry_interval,
            challenge: Bytes::new(),
        };
        let Some(method) = &connect.properties.authentication_method else {
            return self.complete_connect(now, i, pending);
        };
        let method = method.as_str().to_string();
        let challenge = match self.auth.get_mut(&method) {
            None => Err(ReasonCode::BadAuthenticationMethod),
            Some(m) => m.challenge(
                &pending.client,
                connect.properties.authentication_data.as_ref(),
            ),
        };
        match challenge {
            Ok(challenge) => {
                pending.challenge = challenge.clone();
                let side = &mut self.conns[i];
                side.method = Some(method);
                side.pending = Some(pending);
                side.conn
                    .auth_continue(Some(challenge))
                    .expect("CONNECT is pending");
            }
            Err(reason) => self.refuse(now, i, reason),
        }
    }

    fn on_auth_continue(&mut self, now: Instant, i: usize, data: Option<Bytes>) {
        let side = &mut self.conns[i];
        let Some(method) = side.method.clone() else {
            return self.refuse(now, i, ReasonCode::ProtocolError);
        };
        let challenge = if side.conn.is_connected() {
            side.reauth_challenge.take()
        } else {
            side.pending.as_ref().map(|p| p.challenge.clone())
        };
        let verified = match (challenge, self.auth.get_mut(&method)) {
            (Some(challenge), Some(m)) => m.verify(&challenge, data.as_ref()),
            _ => false,
        };
        let side = &mut self.conns[i];
        if side.conn.is_closed() {
            return;
        }
        match (verified, side.conn.is_connected()) {
            (false, _) => self.refuse(now, i, ReasonCode::NotAuthorized),
            (true, true) => side.conn.reauth_success(None).expect("re-authenticating"),
            (true, false) => {
                let pending = side.pending.take().expect("CONNECT is pending");
                self.complete_connect(now, i, pending);
            }
        }
    }

    fn on_reauthenticate(&mut self, now: Instant, i: usize, data: Option<Bytes>) {
        let side = &mut self.conns[i];
        if side.conn.is_closed() {
            return;
        }
        let client = side.conn.client_id().cloned().unwrap_or_default();
        let challenge = match side.method.as_ref().and_then(|m| self.auth.get_mut(m)) {
            Some(m) => m.challenge(&client, data.as_ref()),
            None => Err(ReasonCode::BadAuthenticationMethod),
        };
        match challenge {
            Ok(challenge) => {
                side.reauth_challenge = Some(challenge.clone());
                side.conn
                    .auth_continue(Some(challenge))
                    .expect("re-authenticating");
            }
            Err(reason) => self.refuse(now, i, reason),
        }
    }

    fn complete_connect(&mut self, now: Instant, i: usize, pending: PendingConnect) {
        let PendingConnect {
            client,
            assigned,
            clean_start,
            expiry,
            ..
        } = pending;
        if self.conns[i].conn.is_closed() {
            // The link failed while the broker was deciding; the stored session stays stored.
            return;
        }
        if let Some(old) = self.online.get(&client).copied().filter(|&old| old != i) {
            // Takeover [MQTT-3.1.4-3]: close the old connection and take its session back first.
            self.conns[old]
                .conn
                .disconnect(now, ReasonCode::SessionTakenOver);
            self.drain_events(now, old);
            // The old connection is closed before the new one is made: a will without delay
            // is published [MQTT-3.1.4-3], one with a delay is not [MQTT-3.1.3-9].
            self.fire_session_timer(now, &client);
        }
        let stored = self.sessions.remove(&client);
        let (session, session_present) = match stored {
            Some(session) if !clean_start => (session, true),
            stored => {
                if let Some(mut old) = stored {
                    self.subscriptions.remove(&client);
                    if let Some(will) = old.end(now) {
                        self.publish_will(now, &client, will);
                    }
                }
                (
                    Session::new(client.clone(), expiry, self.session_limits),
                    false,
                )
            }
        };
        let mut accept = Accept::new(session, session_present);
        if assigned {
            accept.assigned_client_id = Some(client.clone());
        }
        self.conns[i]
            .conn
            .accept(now, accept)
            .expect("CONNECT is pending");
        self.online.insert(client.clone(), i);
        self.log.push((
            now,
            BrokerLog::Accepted {
                client,
                session_present,
            },
        ));
    }

    /// Routes `message` to every matching subscription: one delivery per subscriber, at the
    /// highest QoS its matching subscriptions grant, capped by the message's. Offline
    /// persistent subscribers get QoS 1 and 2 messages queued in their stored session. Returns
    /// the number of subscribers matched.
    fn route(&mut self, now: Instant, from: Option<&ClientId>, message: Arc<Message>) -> usize {
        let targets: Vec<(ClientId, Delivery)> = self
            .subscriptions
            .iter()
            .filter_map(|(client, subs)| {
                let matching: Vec<&Sub> = subs
                    .iter()
                    .filter(|s| s.filter.matches(&message.topic))
                    .filter(|s| !(s.options.no_local && from == Some(client)))
                    .collect();
                let granted = matching.iter().map(|s| s.options.qos).max()?;
                Some((
                    client.clone(),
                    Delivery {
                        message: message.clone(),
                        qos: granted.min(message.qos),
                        retain: message.retain
                            && matching.iter().any(|s| s.options.retain_as_published),
                        subscription_ids: matching.iter().filter_map(|s| s.id).collect(),
                        shared: None,
                        store_seq: None,
                    },
                ))
            })
            .collect();
        let matched = targets.len();
        for (client, delivery) in targets {
            if let Some(&i) = self.online.get(&client) {
                let _ = self.conns[i].conn.deliver(now, delivery);
            } else if let Some(session) = self.sessions.get_mut(&client) {
                if delivery.qos != QoS::AtMostOnce {
                    let _ = session.enqueue(now, delivery);
                }
            }
        }
        matched
    }
}

/// Bytes or the end of the stream, arriving at a given time.
enum Segment {
    Data(Bytes),
    Fin,
}

/// One direction of a link.
struct Half {
    queue: VecDeque<(Instant, Segment)>,
    buf: BytesMut,
    reader: PacketReader,
    stalled: bool,
    /// The sender closed this direction.
    fin_sent: bool,
    /// The receiver saw a decode error: the rest of the stream is unusable.
    broken: bool,
}

impl Half {
    fn new(max_packet_size: u32) -> Self {
        Self {
            queue: VecDeque::new(),
            buf: BytesMut::new(),
            reader: PacketReader::new(max_packet_size),
            stalled: false,
            fin_sent: false,
            broken: false,
        }
    }

    /// When the next segment arrives, unless the direction is stalled.
    fn next_arrival(&self) -> Option<Instant> {
        if self.stalled {
            return None;
        }
        self.queue.front().map(|(at, _)| *at)
    }
}

struct Link {
    client: ClientRef,
    conn: usize,
    latency: Duration,
    up: bool,
    to_server: Half,
    to_client: Half,
}

impl Link {
    fn half(&mut self, dir: Dir) -> &mut Half {
        match dir {
            Dir::ToServer => &mut self.to_server,
            Dir::ToClient => &mut self.to_client,
        }
    }
}

/// A client and what its application has seen.
pub(crate) struct SimClient {
    /// The configuration of the next connection.
    pub(crate) config: ClientConfig,
    /// The current connection; once closed, it keeps the session for the next one, which
    /// takes it in [`Sim::connect`] (so the application can still acknowledge messages after
    /// a failure, as it would between the failure and its reconnect).
    conn: Option<ClientConnection>,
    link: Option<usize>,
    /// Every event the client machine reported, with when, across connections.
    pub(crate) inbox: Vec<(Instant, client::Event)>,
    /// Answers enhanced authentication challenges.
    pub(crate) auth_answer: Option<AuthAnswer>,
    triggers: Vec<Trigger>,
    reconnect_after: Option<Duration>,
    reconnect_at: Option<Instant>,
    closed_seen: bool,
    latency: Duration,
}

/// The simulation: a virtual clock, a broker, clients, and the links between them.
pub(crate) struct Sim {
    start: Instant,
    now: Instant,
    pub(crate) broker: Broker,
    clients: Vec<SimClient>,
    links: Vec<Link>,
    wire: Vec<WireRecord>,
    chaos: Option<Chaos>,
}

/// Random link failures from a seeded generator: each packet that reaches its receiver cuts
/// the link with probability `per_mille / 1000`, before or after it is handled.
#[derive(Debug, Clone, Copy)]
struct Chaos {
    state: u64,
    per_mille: u64,
}

impl Chaos {
    /// xorshift64*: small, fast and the same everywhere.
    fn next(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn roll(&mut self) -> Option<Cut> {
        let r = self.next();
        let cut = if r & (1 << 40) == 0 {
            Cut::Before
        } else {
            Cut::After
        };
        (r % 1000 < self.per_mille).then_some(cut)
    }
}

impl Sim {
    /// A simulation with a broker using `config`.
    pub(crate) fn new(config: ServerConfig) -> Self {
        let start = Instant::now();
        Self {
            start,
            now: start,
            broker: Broker::new(config),
            clients: Vec::new(),
            links: Vec::new(),
            wire: Vec::new(),
            chaos: None,
        }
    }

    /// The current virtual time.
    pub(crate) fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time since the start.
    pub(crate) fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Adds a client, not yet connected.
    pub(crate) fn add_client(&mut self, config: ClientConfig) -> ClientRef {
        self.clients.push(SimClient {
            config,
            conn: None,
            link: None,
            inbox: Vec::new(),
            auth_answer: None,
            triggers: Vec::new(),
            reconnect_after: None,
            reconnect_at: None,
            closed_seen: false,
            latency: LATENCY,
        });
        ClientRef(self.clients.len() - 1)
    }

    /// The client's state and inbox.
    pub(crate) fn sim_client(&mut self, c: ClientRef) -> &mut SimClient {
        &mut self.clients[c.0]
    }

    /// The client's current (or last) connection.
    pub(crate) fn client(&mut self, c: ClientRef) -> &mut ClientConnection {
        self.clients[c.0]
            .conn
            .as_mut()
            .expect("client never connected")
    }

    /// Sets the one-way latency of the client's next links.
    pub(crate) fn set_latency(&mut self, c: ClientRef, latency: Duration) {
        self.clients[c.0].latency = latency;
    }

    /// Reconnects the client automatically `delay` after each of its connections closes.
    pub(crate) fn auto_reconnect(&mut self, c: ClientRef, delay: Option<Duration>) {
        self.clients[c.0].reconnect_after = delay;
    }

    /// Arms a trigger that cuts the client's link.
    pub(crate) fn cut_on(&mut self, c: ClientRef, trigger: Trigger) {
        self.clients[c.0].triggers.push(trigger);
    }

    /// Cuts links at random (seeded, so reproducible): each packet reaching its receiver cuts
    /// its link with probability `per_mille / 1000`. `None` stops it.
    pub(crate) fn chaos(&mut self, seed_and_rate: Option<(u64, u64)>) {
        self.chaos = seed_and_rate.map(|(seed, per_mille)| Chaos {
            state: seed.max(1),
            per_mille,
        });
    }

    /// Opens a new link and a new connection for the client, resuming the session it kept.
    pub(crate) fn connect(&mut self, c: ClientRef) {
        let now = self.now;
        let client = &mut self.clients[c.0];
        assert!(
            client.conn.as_ref().is_none_or(ClientConnection::is_closed),
            "client {c:?} is still connected"
        );
        let session = client
            .conn
            .as_mut()
            .and_then(ClientConnection::take_session);
        let conn = ClientConnection::new(client.config.clone(), session, now);
        let client_max = conn.max_packet_size();
        client.conn = Some(conn);
        client.closed_seen = false;
        client.reconnect_at = None;
        let server = ServerConnection::new(self.broker.config.clone(), now);
        let server_max = server.max_packet_size();
        let li = self.links.len();
        self.broker.conns.push(ServerSide {
            conn: server,
            link: Some(li),
            method: None,
            pending: None,
            reauth_challenge: None,
        });
        self.links.push(Link {
            client: c,
            conn: self.broker.conns.len() - 1,
            latency: client.latency,
            up: true,
            to_server: Half::new(server_max),
            to_client: Half::new(client_max),
        });
        client.link = Some(li);
    }

    /// Connects the client and drives until the exchange is over.
    pub(crate) fn connect_and_drive(&mut self, c: ClientRef) {
        self.connect(c);
        self.drive();
    }

    /// Cuts the client's link: both ends learn at once, bytes in flight are lost.
    pub(crate) fn cut(&mut self, c: ClientRef) {
        if let Some(li) = self.clients[c.0].link {
            self.cut_link(li);
        }
    }

    /// Stalls (or resumes) one direction of the client's link: bytes are held, not delivered.
    pub(crate) fn stall(&mut self, c: ClientRef, dir: Dir, stalled: bool) {
        let li = self.clients[c.0].link.expect("client has no link");
        self.links[li].half(dir).stalled = stalled;
    }

    /// Writes a packet on the client's link as if the client machine had sent it, bypassing
    /// its checks: for testing how the broker answers a misbehaving client.
    pub(crate) fn inject(&mut self, c: ClientRef, packet: Packet) {
        let li = self.clients[c.0].link.expect("client has no link");
        let version = self.clients[c.0].config.version;
        self.send(li, Dir::ToServer, version, packet);
    }

    /// Releases the acknowledgements the broker held back under [`Broker::hold_acks`].
    pub(crate) fn release_acks(&mut self) {
        for (i, id, reason) in std::mem::take(&mut self.broker.held) {
            let _ = self.broker.conns[i].conn.publish_ack(id, reason);
        }
    }

    /// Every packet seen on the wire.
    pub(crate) fn wire(&self) -> &[WireRecord] {
        &self.wire
    }

    /// The events the client reported.
    pub(crate) fn inbox(&self, c: ClientRef) -> &[(Instant, client::Event)] {
        &self.clients[c.0].inbox
    }

    /// The messages the client's application received, in order: (topic, payload).
    pub(crate) fn received(&self, c: ClientRef) -> Vec<(String, Bytes)> {
        self.received_messages(c)
            .into_iter()
            .map(|m| (m.topic.as_str().to_string(), m.payload))
            .collect()
    }

    /// The messages the client's application received, in order.
    pub(crate) fn received_messages(&self, c: ClientRef) -> Vec<Message> {
        self.inbox(c)
            .iter()
            .filter_map(|(_, e)| match e {
                client::Event::Publish(p) => Some(p.message.clone()),
                _ => None,
            })
            .collect()
    }

    /// The payloads the client received, as strings.
    pub(crate) fn payloads(&self, c: ClientRef) -> Vec<String> {
        self.received(c)
            .into_iter()
            .map(|(_, p)| String::from_utf8(p.to_vec()).expect("UTF-8 payload"))
            .collect()
    }

    /// The CONNACKs the client received (accepting or refusing), in order.
    pub(crate) fn connacks(&self, c: ClientRef) -> Vec<mqttd_proto::ConnAck> {
        self.inbox(c)
            .iter()
            .filter_map(|(_, e)| match e {
                client::Event::Connected(a) | client::Event::Rejected(a) => Some(a.clone()),
                _ => None,
            })
            .collect()
    }

    /// How each of the client's connections closed: (reason, by_server).
    pub(crate) fn closes(&self, c: ClientRef) -> Vec<(ReasonCode, bool)> {
        self.inbox(c)
            .iter()
            .filter_map(|(_, e)| match e {
                client::Event::Closed { reason, by_server } => Some((*reason, *by_server)),
                _ => None,
            })
            .collect()
    }

    /// Whether the client is connected.
    pub(crate) fn is_connected(&self, c: ClientRef) -> bool {
        self.clients[c.0]
            .conn
            .as_ref()
            .is_some_and(ClientConnection::is_connected)
    }

    /// Publishes from the client's application.
    pub(crate) fn publish(
        &mut self,
        c: ClientRef,
        topic: &str,
        payload: &str,
        qos: QoS,
    ) -> Enqueued {
        let message = Message::new(topic_name(topic), payload.to_string(), qos, false);
        self.publish_message(c, message)
    }

    /// Publishes a prepared message from the client's application.
    pub(crate) fn publish_message(&mut self, c: ClientRef, message: Message) -> Enqueued {
        let now = self.now;
        self.client(c)
            .publish(now, Arc::new(message))
            .expect("publish refused")
    }

    /// Subscribes the client to `filter` with `qos`.
    pub(crate) fn subscribe(&mut self, c: ClientRef, filter: &str, qos: QoS) {
        let sub = Subscription {
            filter: TopicFilter::try_from(filter).expect("valid filter"),
            options: SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            },
        };
        self.client(c)
            .subscribe(vec![sub], Default::default())
            .expect("subscribe");
    }

    /// Disconnects the client normally: DISCONNECT with `reason` and, for MQTT 5, an optional
    /// new session expiry interval.
    pub(crate) fn disconnect(&mut self, c: ClientRef, reason: ReasonCode, expiry: Option<u32>) {
        let now = self.now;
        self.client(c).disconnect(now, reason, expiry);
    }

    /// The packets of one direction of the client's links, as decoded by their receiver.
    pub(crate) fn received_on_wire(&self, c: ClientRef, dir: Dir) -> Vec<(Instant, Packet)> {
        self.wire
            .iter()
            .filter(|r| r.client == c && r.dir == dir && !r.sent)
            .map(|r| (r.at, r.packet.clone()))
            .collect()
    }

    /// The largest number of QoS 1 and 2 flows the sender of `dir` on the client's links ever
    /// had open on one connection, measured at the sender: a flow opens when it writes
    /// PUBLISH (or, resuming a flow, PUBREL) and closes when it receives PUBACK, PUBCOMP or a
    /// refusing PUBREC. This is what the receiver's receive maximum bounds [MQTT-3.3.4-9].
    pub(crate) fn max_in_flight(&self, c: ClientRef, dir: Dir) -> usize {
        let mut open = std::collections::BTreeSet::new();
        let mut max = 0;
        for r in self.wire.iter().filter(|r| r.client == c) {
            match (&r.packet, r.sent, r.dir == dir) {
                (Packet::Connect(_), true, _) => open.clear(),
                (Packet::Publish(p), true, true) => {
                    if let Some(id) = p.packet_id {
                        open.insert(id);
                    }
                }
                (Packet::PubRel(rel), true, true) => {
                    open.insert(rel.packet_id);
                }
                (Packet::PubAck(ack) | Packet::PubComp(ack), false, false) => {
                    open.remove(&ack.packet_id);
                }
                (Packet::PubRec(rec), false, false) if rec.reason.is_error() => {
                    open.remove(&rec.packet_id);
                }
                _ => {}
            }
            max = max.max(open.len());
        }
        max
    }

    /// Delivers everything in flight, firing the timers that fall due on the way, and stops
    /// as soon as no bytes are in flight (later timers are left to [`Self::advance`]).
    pub(crate) fn drive(&mut self) {
        loop {
            self.settle();
            if !self.in_flight() {
                return;
            }
            let next = self.next_event().expect("bytes in flight arrive some time");
            self.now = self.now.max(next);
        }
    }

    /// Moves the clock forward by `d`, firing timers and delivering bytes in order.
    pub(crate) fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        self.run_until(target);
    }

    /// Moves the clock to `at`, firing timers and delivering bytes in order.
    pub(crate) fn advance_until(&mut self, at: Instant) {
        assert!(at >= self.now, "time only moves forward");
        self.run_until(at);
    }

    fn run_until(&mut self, target: Instant) {
        loop {
            self.settle();
            match self.next_event() {
                Some(next) if next <= target => self.now = self.now.max(next),
                _ => break,
            }
        }
        self.now = target;
        self.settle();
    }

    fn in_flight(&self) -> bool {
        self.links.iter().any(|l| {
            l.up && (l.to_server.next_arrival().is_some() || l.to_client.next_arrival().is_some())
        })
    }

    /// The earliest arrival or timer.
    fn next_event(&self) -> Option<Instant> {
        let arrivals = self
            .links
            .iter()
            .filter(|l| l.up)
            .flat_map(|l| [l.to_server.next_arrival(), l.to_client.next_arrival()])
            .flatten();
        let clients = self.clients.iter().flat_map(|c| {
            let conn = c.conn.as_ref().and_then(ClientConnection::poll_timeout);
            [conn, c.reconnect_at]
        });
        arrivals
            .chain(clients.flatten())
            .chain(self.broker.timeout())
            .min()
    }

    /// Runs everything due at the current instant until nothing moves.
    fn settle(&mut self) {
        for _ in 0..MAX_STEPS_PER_INSTANT {
            let mut progress = self.fire_timers();
            progress |= self.deliver_due();
            progress |= self.poll_clients();
            progress |= self.poll_broker();
            if !progress {
                return;
            }
        }
        panic!("livelock at {:?}", self.elapsed());
    }

    fn fire_timers(&mut self) -> bool {
        let now = self.now;
        let mut fired = self.broker.fire_timers(now);
        for i in 0..self.clients.len() {
            let client = &mut self.clients[i];
            if let Some(conn) = &mut client.conn {
                if conn.poll_timeout().is_some_and(|t| t <= now) {
                    conn.handle_timeout(now);
                    fired = true;
                }
            }
            if client.reconnect_at.is_some_and(|t| t <= now) {
                self.connect(ClientRef(i));
                fired = true;
            }
        }
        fired
    }

    fn deliver_due(&mut self) -> bool {
        let mut delivered = false;
        for li in 0..self.links.len() {
            for dir in [Dir::ToServer, Dir::ToClient] {
                delivered |= self.deliver_half(li, dir);
            }
        }
        delivered
    }

    fn deliver_half(&mut self, li: usize, dir: Dir) -> bool {
        let now = self.now;
        let mut delivered = false;
        loop {
            let link = &mut self.links[li];
            if !link.up {
                return delivered;
            }
            let half = link.half(dir);
            if half.next_arrival().is_none_or(|at| at > now) {
                return delivered;
            }
            let Some((_, segment)) = half.queue.pop_front() else {
                return delivered;
            };
            delivered = true;
            let data = match segment {
                Segment::Fin => {
                    self.receiver_lost(li, dir);
                    continue;
                }
                Segment::Data(data) if !half.broken => data,
                Segment::Data(_) => continue,
            };
            half.buf.extend_from_slice(&data);
            loop {
                let version = self.receiver_version(li, dir);
                let half = self.links[li].half(dir);
                let packet = match half.reader.read(&mut half.buf, version) {
                    Ok(Some(packet)) => packet,
                    Ok(None) => break,
                    Err(error) => {
                        half.broken = true;
                        half.buf.clear();
                        let conn = self.links[li].conn;
                        match dir {
                            Dir::ToServer => self.broker.conns[conn]
                                .conn
                                .handle_decode_error(now, &error),
                            Dir::ToClient => {
                                let c = self.links[li].client;
                                if let Some(conn) = &mut self.clients[c.0].conn {
                                    conn.handle_decode_error(now, &error);
                                }
                            }
                        }
                        break;
                    }
                };
                if !self.receive(li, dir, packet) {
                    return true;
                }
            }
        }
    }

    fn receiver_version(&self, li: usize, dir: Dir) -> Option<ProtocolVersion> {
        let link = &self.links[li];
        match dir {
            Dir::ToServer => self.broker.conns[link.conn].conn.version(),
            Dir::ToClient => Some(self.clients[link.client.0].config.version),
        }
    }

    /// Hands a decoded packet to its receiver, unless a trigger cuts the link first. Returns
    /// whether the link is still up.
    fn receive(&mut self, li: usize, dir: Dir, packet: Packet) -> bool {
        let now = self.now;
        let c = self.links[li].client;
        self.wire.push(WireRecord {
            at: now,
            client: c,
            dir,
            sent: false,
            packet: packet.clone(),
        });
        let kind = packet.packet_type();
        let triggers = &mut self.clients[c.0].triggers;
        let mut cut = None;
        if let Some(t) = triggers.iter_mut().find(|t| t.dir == dir && t.kind == kind) {
            if t.skip == 0 {
                cut = Some(t.cut);
            } else {
                t.skip -= 1;
            }
        }
        if cut.is_some() {
            let pos = triggers
                .iter()
                .position(|t| t.dir == dir && t.kind == kind)
                .expect("just found");
            triggers.remove(pos);
        }
        if cut.is_none() {
            cut = self.chaos.as_mut().and_then(Chaos::roll);
        }
        if cut == Some(Cut::Before) {
            self.cut_link(li);
            return false;
        }
        let conn = self.links[li].conn;
        match dir {
            Dir::ToServer => self.broker.conns[conn].conn.handle_packet(now, packet),
            Dir::ToClient => {
                if let Some(conn) = &mut self.clients[c.0].conn {
                    conn.handle_packet(now, packet);
                }
            }
        }
        if cut == Some(Cut::After) {
            self.cut_link(li);
            return false;
        }
        true
    }

    /// The receiver of `dir` saw the stream end.
    fn receiver_lost(&mut self, li: usize, dir: Dir) {
        let now = self.now;
        let link = &mut self.links[li];
        match dir {
            Dir::ToServer => self.broker.conns[link.conn].conn.connection_lost(now),
            Dir::ToClient => {
                if let Some(conn) = &mut self.clients[link.client.0].conn {
                    conn.connection_lost(now);
                }
            }
        }
        if link.to_server.fin_sent && link.to_client.fin_sent {
            self.close_link(li);
        }
    }

    fn close_link(&mut self, li: usize) {
        let link = &mut self.links[li];
        link.up = false;
        link.to_server.queue.clear();
        link.to_client.queue.clear();
        let c = link.client;
        let conn = link.conn;
        if self.clients[c.0].link == Some(li) {
            self.clients[c.0].link = None;
        }
        if self.broker.conns[conn].link == Some(li) {
            self.broker.conns[conn].link = None;
        }
    }

    fn cut_link(&mut self, li: usize) {
        if !self.links[li].up {
            return;
        }
        let now = self.now;
        self.close_link(li);
        let link = &self.links[li];
        self.broker.conns[link.conn].conn.connection_lost(now);
        if let Some(conn) = &mut self.clients[link.client.0].conn {
            conn.connection_lost(now);
        }
    }

    /// Encodes `packet` with `version` and puts it on the link.
    fn send(&mut self, li: usize, dir: Dir, version: ProtocolVersion, packet: Packet) {
        let link = &mut self.links[li];
        let mut bytes = BytesMut::new();
        packet
            .encode(version, &mut bytes)
            .unwrap_or_else(|e| panic!("cannot encode {packet:?} for {version}: {e}"));
        let arrival = self.now + link.latency;
        let client = link.client;
        let half = link.half(dir);
        assert!(
            !half.fin_sent,
            "{dir:?} {packet:?} sent after the stream ended"
        );
        half.queue
            .push_back((arrival, Segment::Data(bytes.freeze())));
        self.wire.push(WireRecord {
            at: self.now,
            client,
            dir,
            sent: true,
            packet,
        });
    }

    fn send_fin(&mut self, li: usize, dir: Dir) {
        let link = &mut self.links[li];
        let arrival = self.now + link.latency;
        let up = link.up;
        let half = link.half(dir);
        if up && !half.fin_sent {
            half.fin_sent = true;
            half.queue.push_back((arrival, Segment::Fin));
        }
    }

    fn poll_clients(&mut self) -> bool {
        let now = self.now;
        let mut progress = false;
        for i in 0..self.clients.len() {
            let client = &mut self.clients[i];
            let Some(conn) = &mut client.conn else {
                continue;
            };
            while let Some(event) = conn.poll_event() {
                progress = true;
                if let (client::Event::AuthChallenge { data }, Some(answer)) =
                    (&event, client.auth_answer)
                {
                    let answer = answer(data.as_deref().unwrap_or_default());
                    conn.auth_continue(Some(answer))
                        .expect("authentication in progress");
                }
                client.inbox.push((now, event));
            }
            let version = client.config.version;
            let link = client.link;
            let mut out = Vec::new();
            while let Some(packet) = conn.poll_transmit(now) {
                out.push(packet);
            }
            let closed = conn.is_closed() && !client.closed_seen;
            progress |= !out.is_empty() || closed;
            if let Some(li) = link {
                for packet in out {
                    self.send(li, Dir::ToServer, version, packet);
                }
            }
            if closed {
                let client = &mut self.clients[i];
                client.closed_seen = true;
                client.reconnect_at = client.reconnect_after.map(|d| now + d);
                if let Some(li) = link {
                    self.send_fin(li, Dir::ToServer);
                }
            }
        }
        progress
    }

    fn poll_broker(&mut self) -> bool {
        let now = self.now;
        let mut progress = false;
        for i in 0..self.broker.conns.len() {
            progress |= self.broker.drain_events(now, i);
            let side = &mut self.broker.conns[i];
            let version = side.conn.version().unwrap_or(ProtocolVersion::V5);
            let link = side.link;
            let mut out = Vec::new();
            while let Some(packet) = side.conn.poll_transmit() {
                out.push(packet);
            }
            progress |= !out.is_empty();
            if let Some(li) = link {
                for packet in out {
                    self.send(li, Dir::ToClient, version, packet);
                }
                if self.broker.conns[i].conn.is_closed() && !self.links[li].to_client.fin_sent {
                    progress = true;
                    self.send_fin(li, Dir::ToClient);
                }
            }
        }
        progress
    }
}

/// A client identifier.
pub(crate) fn cid(s: &str) -> ClientId {
    ClientId::try_from(s).expect("valid client identifier")
}

/// A topic name.
pub(crate) fn topic_name(s: &str) -> TopicName {
    TopicName::try_from(s).expect("valid topic name")
}

/// A client configuration for MQTT 5: `id`, clean start, keep alive 60 s.
pub(crate) fn client_config(id: &str) -> ClientConfig {
    ClientConfig::new(cid(id))
}

/// A persistent client configuration: no clean start, session expiry `expiry` seconds.
pub(crate) fn persistent_config(id: &str, expiry: u32) -> ClientConfig {
    ClientConfig {
        clean_start: false,
        session_expiry_interval: expiry,
        ..client_config(id)
    }
}
