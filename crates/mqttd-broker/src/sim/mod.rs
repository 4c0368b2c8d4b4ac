//! A deterministic simulation of clients against the real broker, in the spirit of
//! quinn-proto's `Pair`: the broker's own shared state ([`Inner`]) and one real
//! [`ConnectionCore`] per connection, driven without sockets, against protocol-core clients,
//! with a virtual clock and a storage whose watermark moves only when the test says so.
//!
//! # Pieces
//!
//! - [`Sim`] owns the broker state, the [`SimStorage`] and the clients.
//! - A client is a [`ClientConnection`] plus what its application saw, across reconnects.
//!   Its connection to the broker is a [`ConnectionCore`]; bytes move between them per
//!   stream, through the codec both ways. A [`StreamRouter`] puts chosen client packets on
//!   data streams (a synthetic multi-stream transport, as MQTT over QUIC has): answers come
//!   back on the stream they belong to, as the core says.
//! - A client can stop reading (its bytes wait at the broker, whose output backs up), and a
//!   connection can be cut (both sides learn at once).
//!
//! # Time
//!
//! Tests run on a current-thread tokio runtime with paused time, which is the broker's clock
//! (`crate::clock`). [`Sim::drive`] moves everything that can move at the current instant;
//! [`Sim::advance`] moves the clock to each due timer (the cores', the clients', and the
//! broker's session timers, which are tokio tasks) up to a target. Nothing reads the system
//! clock.

mod scenarios;
mod storage;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::task::JoinHandle;

use mqttd_proto::client::{ClientConfig, ClientConnection, Event as ClientEvent};
use mqttd_proto::codec::PacketReader;
use mqttd_proto::{ClientId, Packet, StreamId};

use crate::broker::{Acquired, Inner};
use crate::config::Config;
use crate::core::{ConnectionCore, Request};
use crate::hooks::{Peer, Transport};
use crate::storage::Watermark;

pub(crate) use storage::SimStorage;

/// What a connection's stream holds between the broker's writes and the client's reads, as
/// a socket's buffers do: a client that does not read makes the broker's output back up.
const SOCKET_BUFFER: usize = 64 * 1024;

/// Passes allowed at one instant before the harness declares a livelock.
const MAX_PASSES: usize = 10_000;

/// Chooses the stream of each packet a client sends (the client machine sends what it
/// starts on the control stream and answers on the stream of what it answers).
pub(crate) type StreamRouter = Box<dyn Fn(&Packet) -> Option<StreamId>>;

/// A client's index in the simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientRef(usize);

/// The broker side of a client's current connection.
struct Link {
    core: ConnectionCore,
    /// Bytes the client sent, per stream, not yet read by the broker.
    to_server: BTreeMap<StreamId, BytesMut>,
    /// Bytes the broker wrote, per stream, not yet read by the client.
    to_client: BTreeMap<StreamId, BytesMut>,
    /// A session being acquired for it.
    acquiring: Option<JoinHandle<Acquired>>,
    /// The last watermark the core was given.
    watermark: Watermark,
}

impl Link {
    /// Passes in what woke the connection: its mailbox (unless it waits for a request) and a
    /// watermark it has not seen. Whether anything did.
    fn wake(&mut self, t: Instant, watermark: Watermark) -> bool {
        let mut moved = false;
        if !self.core.is_waiting() {
            let inbox = self.core.mailbox().take();
            if !inbox.deliveries.is_empty() || inbox.takeover.is_some() {
                self.core.handle_inbox(t, inbox);
                moved = true;
            }
        }
        if self.core.waits_for_storage() && watermark != self.watermark {
            self.watermark = watermark;
            self.core.handle_watermark(t, watermark);
            moved = true;
        }
        moved
    }
}

/// One simulated client.
pub(crate) struct Client {
    pub(crate) config: ClientConfig,
    pub(crate) conn: ClientConnection,
    link: Option<Link>,
    /// Earlier connections the client gave up on (its network changed) that the broker still
    /// holds until the new connection takes their session over or they time out; what the
    /// broker sends on them is lost.
    abandoned: Vec<Link>,
    /// Everything its application saw, across connections.
    pub(crate) events: Vec<ClientEvent>,
    /// Whether it reads what the broker sends.
    pub(crate) reading: bool,
    /// Puts packets on data streams; everything goes on the control stream without one.
    pub(crate) router: Option<StreamRouter>,
    /// Every packet it received, with its stream.
    pub(crate) received: Vec<(StreamId, Packet)>,
}

/// The simulation: the broker and its clients.
pub(crate) struct Sim {
    pub(crate) inner: Arc<Inner>,
    pub(crate) storage: Arc<SimStorage>,
    pub(crate) clients: Vec<Client>,
    /// Whether storage makes every change durable as soon as it is recorded (a fast disk).
    pub(crate) auto_durable: bool,
    next_port: u16,
}

/// The broker's clock, paused in tests.
pub(crate) fn now() -> Instant {
    crate::clock::now()
}

impl Sim {
    /// A broker with `config` (anonymous access allowed) on a simulated storage.
    pub(crate) fn new(config: Config) -> Self {
        let storage = Arc::new(SimStorage::default());
        let inner = Inner::for_tests(config, storage.clone());
        Self {
            inner,
            storage,
            clients: Vec::new(),
            auto_durable: true,
            next_port: 1,
        }
    }

    /// Adds a client that connects with `config` (not yet: see [`Self::connect`]).
    pub(crate) fn client(&mut self, config: ClientConfig) -> ClientRef {
        let conn = ClientConnection::new(config.clone(), None, now());
        // A client machine starts out connecting; it is opened for real by `connect`.
        self.clients.push(Client {
            config,
            conn,
            link: None,
            abandoned: Vec::new(),
            events: Vec::new(),
            reading: true,
            router: None,
            received: Vec::new(),
        });
        ClientRef(self.clients.len() - 1)
    }

    /// The client `c`.
    pub(crate) fn get(&mut self, c: ClientRef) -> &mut Client {
        &mut self.clients[c.0]
    }

    /// Opens a new connection for `c`, resuming the session its previous connection left
    /// (the client's own state), and sends CONNECT.
    pub(crate) fn connect(&mut self, c: ClientRef) {
        let port = self.next_port;
        self.next_port += 1;
        let peer = Peer::new(
            Transport::Tcp,
            ([127, 0, 0, 1], port).into(),
            Arc::from("sim"),
        );
        let watermark = self.storage.watermark_now();
        let core = ConnectionCore::new(self.inner.clone(), peer, now(), watermark);
        let client = &mut self.clients[c.0];
        let session = client.conn.take_session();
        client.conn = ClientConnection::new(client.config.clone(), session, now());
        client.link = Some(Link {
            core,
            to_server: BTreeMap::new(),
            to_client: BTreeMap::new(),
            acquiring: None,
            watermark,
        });
    }

    /// Opens a new connection for `c` as a client does whose network changed: it gives up on
    /// its current connection, which the broker still holds, and connects again to resume its
    /// session, taking it over from the old connection.
    pub(crate) fn reconnect_over(&mut self, c: ClientRef) {
        let client = &mut self.clients[c.0];
        client.conn.connection_lost(now());
        Self::collect_events(client);
        if let Some(old) = client.link.take() {
            client.abandoned.push(old);
        }
        self.connect(c);
    }

    /// Sends `packet` from `c` on `stream` as it is, past the client machine.
    pub(crate) fn send_raw(&mut self, c: ClientRef, stream: StreamId, packet: &Packet) {
        let client = &mut self.clients[c.0];
        let version = client.conn.version();
        if let Some(link) = &mut client.link {
            let buf = link.to_server.entry(stream).or_default();
            packet.encode(version, buf).expect("encodable");
        }
    }

    /// Sends `bytes` from `c` on `stream` as they are: malformed input.
    pub(crate) fn send_bytes(&mut self, c: ClientRef, stream: StreamId, bytes: &[u8]) {
        if let Some(link) = &mut self.clients[c.0].link {
            link.to_server
                .entry(stream)
                .or_default()
                .extend_from_slice(bytes);
        }
    }

    /// A data stream of `c`'s connection ends: what was in flight on it is lost, and the
    /// broker learns (the client side learns through its own `stream_lost`).
    pub(crate) fn lose_stream(&mut self, c: ClientRef, stream: StreamId) {
        if let Some(link) = &mut self.clients[c.0].link {
            link.to_server.remove(&stream);
            link.to_client.remove(&stream);
            link.core.stream_lost(now(), stream);
        }
    }

    /// Cuts `c`'s connection: bytes in flight are lost, both sides learn at once.
    pub(crate) fn cut(&mut self, c: ClientRef) {
        let t = now();
        let client = &mut self.clients[c.0];
        client.conn.connection_lost(t);
        if let Some(mut link) = client.link.take() {
            link.core.connection_lost(t);
            Self::close_link(&mut link, t);
        }
        Self::collect_events(client);
    }

    /// Whether `c` has a connection the broker has not closed.
    pub(crate) fn is_linked(&self, c: ClientRef) -> bool {
        self.clients[c.0].link.is_some()
    }

    /// The broker side of `c`'s connection.
    pub(crate) fn core(&self, c: ClientRef) -> Option<&ConnectionCore> {
        self.clients[c.0].link.as_ref().map(|l| &l.core)
    }

    /// Bytes the broker holds for `c`, written or not, across streams.
    pub(crate) fn backlog(&self, c: ClientRef) -> usize {
        self.clients[c.0].link.as_ref().map_or(0, |l| {
            l.to_client.values().map(BytesMut::len).sum::<usize>()
                + l.core.output(StreamId::CONTROL).map_or(0, |o| o.buf.len())
        })
    }

    /// Moves everything that can move now, until nothing does.
    pub(crate) async fn drive(&mut self) {
        for _ in 0..MAX_PASSES {
            // Let the broker's tasks (session acquisition, session timers) run.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            if self.auto_durable {
                self.storage.make_durable();
            }
            let mut moved = false;
            for i in 0..self.clients.len() {
                moved |= self.step(i).await;
            }
            if !moved {
                return;
            }
        }
        panic!("livelock: still moving after {MAX_PASSES} passes");
    }

    /// Moves the clock to `to`, stopping at each timer due on the way and driving after it.
    pub(crate) async fn advance(&mut self, to: Duration) {
        let end = now() + to;
        self.drive().await;
        loop {
            let next = self
                .clients
                .iter()
                .flat_map(|c| {
                    let cores = c.link.iter().chain(&c.abandoned);
                    cores
                        .filter_map(|l| l.core.poll_timeout())
                        .chain(c.conn.poll_timeout())
                        .collect::<Vec<_>>()
                })
                .filter(|t| *t <= end)
                .min();
            // Session timers are tokio tasks: advancing in steps of at most a second lets them
            // fire on time too.
            let step_to = next.unwrap_or(end).min(now() + Duration::from_secs(1));
            let step = step_to.saturating_duration_since(now());
            tokio::time::advance(step).await;
            let t = now();
            for client in &mut self.clients {
                client.conn.handle_timeout(t);
                for link in client.link.iter_mut().chain(&mut client.abandoned) {
                    link.core.handle_timeout(t);
                }
            }
            self.drive().await;
            if now() >= end {
                return;
            }
        }
    }

    /// One pass over client `i` and its connection; whether anything moved.
    async fn step(&mut self, i: usize) -> bool {
        let t = now();
        let watermark = self.storage.watermark_now();
        let inner = self.inner.clone();
        let client = &mut self.clients[i];
        let mut moved = false;
        // Connections the client gave up on: the broker goes on with them alone.
        let mut kept = Vec::new();
        for mut old in std::mem::take(&mut client.abandoned) {
            moved |= old.wake(t, watermark);
            old.core.process(t);
            let streams: Vec<StreamId> = old.core.writable_streams().collect();
            for stream in streams {
                let n = old.core.output(stream).map_or(0, |o| o.writable().len());
                old.core.wrote(stream, n);
            }
            if old.core.is_closed() {
                Self::close_link(&mut old, t);
                moved = true;
            } else {
                kept.push(old);
            }
        }
        client.abandoned = kept;
        let Some(link) = &mut client.link else {
            moved |= Self::collect_events(client);
            return moved;
        };
        // The client's packets, onto their streams.
        while let Some((stream, packet)) = client.conn.poll_transmit_tagged(t) {
            let stream = client
                .router
                .as_ref()
                .and_then(|r| r(&packet))
                .unwrap_or(stream);
            let buf = link.to_server.entry(stream).or_default();
            packet
                .encode(client.conn.version(), buf)
                .expect("the client encodes what it sends");
            moved = true;
        }
        // The broker reads what it wants.
        for (stream, buf) in &mut link.to_server {
            if !buf.is_empty() && link.core.wants_read(*stream) {
                link.core.handle_input(t, *stream, buf);
                moved = true;
            }
        }
        // The answer to a session request.
        if link.acquiring.as_ref().is_some_and(JoinHandle::is_finished) {
            if let Some(task) = link.acquiring.take() {
                let acquired = task.await.expect("acquiring a session does not panic");
                link.core.session_acquired(t, acquired);
                moved = true;
            }
        }
        moved |= link.wake(t, watermark);
        if link.core.blocked_on().is_some() {
            // Publishers look for room at every pass: the room signal is the driver's.
            link.core.retry_blocked(t);
        }
        link.core.process(t);
        if let Some(request) = link.core.poll_request() {
            moved = true;
            match request {
                Request::CheckPassword(check) => {
                    let verdict = check.verify(&inner);
                    link.core.authenticated(t, verdict);
                }
                Request::AcquireSession(request) => {
                    let mailbox = link.core.mailbox().clone();
                    let inner = inner.clone();
                    link.acquiring = Some(tokio::spawn(async move {
                        inner.acquire(now(), &request, &mailbox).await
                    }));
                }
            }
            link.core.process(t);
        }
        // Streams the broker resets: what is in flight on them is lost, and the client learns.
        while let Some((stream, _)) = link.core.poll_reset() {
            link.to_server.remove(&stream);
            link.to_client.remove(&stream);
            client.conn.stream_lost(t, stream);
            moved = true;
        }
        // The broker writes what it may.
        let streams: Vec<StreamId> = link.core.writable_streams().collect();
        for stream in streams {
            let Some(output) = link.core.output(stream) else {
                continue;
            };
            let buf = link.to_client.entry(stream).or_default();
            let room = SOCKET_BUFFER.saturating_sub(buf.len());
            let writable = output.writable();
            let n = writable.len().min(room);
            if n == 0 {
                continue;
            }
            buf.extend_from_slice(&writable[..n]);
            link.core.wrote(stream, n);
            moved = true;
        }
        // The client reads, if it does.
        if client.reading {
            let mut reader = PacketReader::new(client.conn.max_packet_size());
            for (stream, buf) in &mut link.to_client {
                loop {
                    match reader.read(buf, Some(client.conn.version())) {
                        Ok(Some(packet)) => {
                            client.received.push((*stream, packet.clone()));
                            client.conn.handle_packet_on(t, *stream, packet);
                            moved = true;
                        }
                        Ok(None) => break,
                        Err(error) => panic!("the broker sent a malformed packet: {error}"),
                    }
                }
            }
        }
        if link.core.is_closed() && link.acquiring.is_none() {
            // The broker closed the connection. What it has left goes out first, once
            // storage allows (or never, if storage failed); then both sides know.
            link.core.release_output(watermark);
            let held = link
                .core
                .output(StreamId::CONTROL)
                .is_some_and(|o| o.holding());
            if held && !watermark.failed {
                moved |= Self::collect_events(client);
                return moved;
            }
            let mut link = client.link.take().expect("linked");
            Self::close_link(&mut link, t);
            client.conn.connection_lost(t);
            moved = true;
        } else if client.conn.is_closed() {
            // The client closed it: the broker learns once it has read what was sent.
            let drained = link.to_server.values().all(BytesMut::is_empty);
            if drained || !link.core.wants_read(StreamId::CONTROL) {
                link.core.connection_lost(t);
                link.core.process(t);
                moved = true;
            }
        }
        moved |= Self::collect_events(client);
        moved
    }

    /// Hands the session of a closed connection on.
    fn close_link(link: &mut Link, t: Instant) {
        link.core.process(t);
        link.core.finish(t, wall(t));
    }

    fn collect_events(client: &mut Client) -> bool {
        let mut moved = false;
        while let Some(event) = client.conn.poll_event() {
            client.events.push(event);
            moved = true;
        }
        moved
    }
}

/// The wall-clock time at `t`: the epoch plus the virtual time since the test started, so
/// that nothing reads the system clock.
fn wall(t: Instant) -> std::time::SystemTime {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| t);
    std::time::SystemTime::UNIX_EPOCH + t.saturating_duration_since(start)
}

/// A client identifier.
pub(crate) fn id(s: &str) -> ClientId {
    ClientId::try_from(s).expect("a valid client identifier")
}
