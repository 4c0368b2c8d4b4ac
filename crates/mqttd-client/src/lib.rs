//! An async MQTT client: a tokio task driving `mqttd-proto`'s client state machine over any
//! byte stream. `mqttd pub`, `mqttd sub`, `mqttd bench` and the broker's integration tests use
//! it.
//!
//! [`connect`] returns once CONNACK arrives, with a [`Client`] handle for commands and an
//! [`Events`] stream of everything the server sends. Answers to SUBSCRIBE and UNSUBSCRIBE are
//! returned by the calls that sent them; every other event goes to the stream.
//!
//! The stream is bounded ([`EVENT_QUEUE`] events): while the application leaves it full, the
//! connection's task stops reading from the socket, so a server that sends faster than the
//! application consumes fills the TCP window and then its own queues instead of the client's
//! memory. Nothing is dropped: QoS 1 and 2 messages are acknowledged as they are read, so the
//! server keeps the rest until the application catches up. Meanwhile the task still sends
//! (publications, acknowledgements the application makes, PINGREQ) but does not time the
//! server out for a missing PINGRESP, which may be among the unread input; an application
//! that stays behind for more than about one and a half keep alive intervals may be
//! disconnected by a server that times it out.
//!
//! [`transport`] opens the byte stream: TCP, TLS (cargo feature `tls`), WebSocket (cargo
//! feature `ws`) or both, or QUIC (cargo feature `quic`); [`connect_to`] opens one and connects
//! over it.
//!
//! The connection's task drives one stream, or with multi-stream QUIC a control stream and
//! data streams (opened after CONNACK): each stream has its own packet reader and output
//! buffer, and the protocol core says which stream each packet goes on. A PUBLISH goes on the
//! data stream its topic hashes to, a SUBSCRIBE or UNSUBSCRIBE on the one of its first filter;
//! a data stream that fails hands what it owed to the control stream.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use mqttd_proto::client::{ClientConfig, ClientConnection, ClientError, Event};
use mqttd_proto::codec::PacketReader;
use mqttd_proto::session::{Enqueued, Session};
pub mod transport;

pub use transport::{
    Connector, Endpoint, P2pOptions, QuicOptions, ServerUrl, TlsOptions, TlsVersion, Transport,
    TransportError,
};
#[cfg(feature = "quic")]
pub use transport::{QuicInfo, ZeroRtt};

use mqttd_proto::{
    ConnAck, Message, MqttStr, Packet, PacketId, ProtocolVersion, QoS, ReasonCode, StreamId,
    SubAck, SubscribeProperties, Subscription, SubscriptionOptions, TopicFilter, UnsubAck,
};

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The transport could not be established.
    #[error("cannot connect: {0}")]
    Io(#[from] std::io::Error),
    /// The server refused the connection.
    #[error("connection refused: {}", .0.reason)]
    Refused(Box<ConnAck>),
    /// The connection closed before CONNACK.
    #[error("connection closed before CONNACK: {0}")]
    Closed(ReasonCode),
    /// The authenticator failed.
    #[error(transparent)]
    Auth(#[from] AuthFailed),
    /// The transport (TCP, TLS, WebSocket) could not be set up.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The transport failed after it was set up, before CONNACK. With TLS 1.3 this is where a
    /// server's refusal of the client certificate shows.
    #[error("the connection failed before CONNACK: {0}")]
    Lost(std::io::Error),
}

/// An enhanced-authentication method on the client's side (MQTT 5 AUTH exchanges).
pub trait Authenticator: Send + 'static {
    /// The authentication method name sent in CONNECT and AUTH.
    fn method(&self) -> &str;
    /// The initial data, for CONNECT or a re-authentication.
    fn start(&mut self) -> Result<Option<Bytes>, AuthFailed>;
    /// Answers a challenge from the server.
    fn challenge(&mut self, data: Option<Bytes>) -> Result<Option<Bytes>, AuthFailed>;
    /// Checks the server's final data (CONNACK or AUTH success).
    fn finish(&mut self, data: Option<Bytes>) -> Result<(), AuthFailed>;
}

/// An authenticator gave up: the server's data was wrong or could not be answered.
#[derive(Debug, Clone, thiserror::Error)]
#[error("authentication failed: {0}")]
pub struct AuthFailed(pub String);

/// Why a request failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The connection is gone.
    #[error("the connection is closed")]
    Closed,
    /// The state machine refused the request.
    #[error(transparent)]
    Client(#[from] ClientError),
}

enum Command {
    Publish(Arc<Message>, oneshot::Sender<Result<Enqueued, ClientError>>),
    PublishNoReply(Arc<Message>),
    Subscribe(
        Vec<Subscription>,
        SubscribeProperties,
        oneshot::Sender<Result<SubAck, ClientError>>,
    ),
    Unsubscribe(
        Vec<TopicFilter>,
        oneshot::Sender<Result<UnsubAck, ClientError>>,
    ),
    Ack(PacketId, ReasonCode),
    Disconnect(ReasonCode, Option<u32>, oneshot::Sender<Option<Session>>),
    Reauthenticate,
}

/// A handle to a connection; cheap to clone.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    #[cfg(feature = "quic")]
    quic: Option<Arc<QuicInfo>>,
}

/// Everything the server sends that is not the answer to a call: messages, delivery
/// confirmations, and finally [`Event::Closed`]. At most [`EVENT_QUEUE`] events wait here;
/// while they do, the connection stops reading from the server.
pub struct Events {
    rx: mpsc::Receiver<Event>,
    /// The session, once the connection is over (unless [`Client::disconnect`] took it).
    session: oneshot::Receiver<Option<Session>>,
}

impl Events {
    /// The next event; `None` once the connection task has ended.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is waiting, without waiting for one.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// How many events wait to be received (at most [`EVENT_QUEUE`]).
    pub fn queued(&self) -> usize {
        self.rx.len()
    }

    /// Once the connection is over ([`Event::Closed`]): its session, to resume with a later
    /// connection ([`connect`] with clean start off), so that what was in flight both ways is
    /// sent again and not taken for new. `None` if [`Client::disconnect`] returned it already.
    /// Waits for the connection's task to end; events not received yet are discarded.
    pub async fn into_session(self) -> Option<Session> {
        drop(self.rx);
        self.session.await.ok().flatten()
    }

    /// The next message, skipping other events; `None` when the connection is gone.
    pub async fn next_message(&mut self) -> Option<mqttd_proto::InboundPublish> {
        loop {
            match self.rx.recv().await? {
                Event::Publish(p) => return Some(p),
                Event::Closed { .. } => return None,
                _ => {}
            }
        }
    }
}

impl Client {
    /// What the QUIC transport says about the connection (whether 0-RTT was accepted);
    /// `None` for other transports.
    #[cfg(feature = "quic")]
    pub fn quic(&self) -> Option<&QuicInfo> {
        self.quic.as_deref()
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| RequestError::Closed)?;
        rx.await.map_err(|_| RequestError::Closed)
    }

    /// Publishes a message; returns once the state machine took it (sent or queued). For QoS 1
    /// and 2, completion arrives later as [`Event::Delivered`].
    pub async fn publish(&self, message: Message) -> Result<Enqueued, RequestError> {
        Ok(self
            .request(|tx| Command::Publish(Arc::new(message), tx))
            .await??)
    }

    /// Waits for room for one command in the connection's queue. A program that relays between
    /// connections takes room this way inside a `select!` (it is cancel safe), so that it
    /// goes on reading events while a connection's queue is full instead of waiting for it.
    pub async fn reserve(&self) -> Result<Permit<'_>, RequestError> {
        self.commands
            .reserve()
            .await
            .map(Permit)
            .map_err(|_| RequestError::Closed)
    }

    /// Room for one command if there is some now; `None` if the queue is full or the
    /// connection is closed.
    pub fn try_reserve(&self) -> Option<Permit<'_>> {
        self.commands.try_reserve().ok().map(Permit)
    }

    /// Publishes a message without waiting for the state machine's verdict; waits only while
    /// the connection's output is backed up. For load generators.
    pub async fn publish_nowait(&self, message: Arc<Message>) -> Result<(), RequestError> {
        self.commands
            .send(Command::PublishNoReply(message))
            .await
            .map_err(|_| RequestError::Closed)
    }

    /// Subscribes and waits for SUBACK.
    pub async fn subscribe(
        &self,
        filters: Vec<Subscription>,
        properties: SubscribeProperties,
    ) -> Result<SubAck, RequestError> {
        Ok(self
            .request(|tx| Command::Subscribe(filters, properties, tx))
            .await??)
    }

    /// Subscribes to one filter at `qos` and waits for SUBACK.
    pub async fn subscribe_one(
        &self,
        filter: TopicFilter,
        qos: QoS,
    ) -> Result<SubAck, RequestError> {
        let options = SubscriptionOptions {
            qos,
            ..SubscriptionOptions::default()
        };
        self.subscribe(
            vec![Subscription { filter, options }],
            SubscribeProperties::default(),
        )
        .await
    }

    /// Unsubscribes and waits for UNSUBACK.
    pub async fn unsubscribe(&self, filters: Vec<TopicFilter>) -> Result<UnsubAck, RequestError> {
        Ok(self
            .request(|tx| Command::Unsubscribe(filters, tx))
            .await??)
    }

    /// Acknowledges a message (when `auto_ack` is off).
    pub async fn ack(&self, packet_id: PacketId, reason: ReasonCode) -> Result<(), RequestError> {
        self.commands
            .send(Command::Ack(packet_id, reason))
            .await
            .map_err(|_| RequestError::Closed)
    }

    /// Starts a re-authentication with the connection's authenticator; success arrives as
    /// [`Event::ReAuthenticated`], failure closes the connection.
    pub async fn reauthenticate(&self) -> Result<(), RequestError> {
        self.commands
            .send(Command::Reauthenticate)
            .await
            .map_err(|_| RequestError::Closed)
    }

    /// Sends DISCONNECT, closes the connection and returns the session to resume later.
    pub async fn disconnect(
        &self,
        reason: ReasonCode,
        session_expiry: Option<u32>,
    ) -> Result<Option<Session>, RequestError> {
        self.request(|tx| Command::Disconnect(reason, session_expiry, tx))
            .await
    }
}

/// Room for one command, taken with [`Client::reserve`]: using it cannot wait.
pub struct Permit<'a>(mpsc::Permit<'a, Command>);

impl Permit<'_> {
    /// Publishes `message` as [`Client::publish_nowait`] does. The completion of a QoS 1 or 2
    /// message, [`Event::Delivered`], carries this very `Arc`, so that the caller can tell
    /// which of its messages completed.
    pub fn publish(self, message: Arc<Message>) {
        self.0.send(Command::PublishNoReply(message));
    }

    /// Publishes `message` as [`Permit::publish`] does, with the state machine's verdict to
    /// await: a message it drops (expired, too large for the server, queue full) never
    /// completes with [`Event::Delivered`], so a caller that waits for completion looks here.
    pub fn publish_with_verdict(self, message: Arc<Message>) -> Verdict {
        let (tx, rx) = oneshot::channel();
        self.0.send(Command::Publish(message, tx));
        Verdict(rx)
    }

    /// Acknowledges a message, as [`Client::ack`] does.
    pub fn ack(self, packet_id: PacketId, reason: ReasonCode) {
        self.0.send(Command::Ack(packet_id, reason));
    }
}

/// The state machine's verdict on a publication ([`Permit::publish_with_verdict`]): sent,
/// queued, or why not. Verdicts come in the order the publications were made.
pub struct Verdict(oneshot::Receiver<Result<Enqueued, ClientError>>);

impl Future for Verdict {
    type Output = Result<Enqueued, RequestError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|answer| match answer {
                Ok(Ok(enqueued)) => Ok(enqueued),
                Ok(Err(error)) => Err(RequestError::Client(error)),
                Err(_) => Err(RequestError::Closed),
            })
    }
}

/// Connects over TCP.
pub async fn connect_tcp(
    addr: SocketAddr,
    config: ClientConfig,
    session: Option<Session>,
) -> Result<(Client, Events, ConnAck), ConnectError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    connect(stream, config, session).await
}

/// Opens a stream with `connector` (TCP, TLS, WebSocket) and connects over it.
pub async fn connect_to(
    connector: &Connector,
    config: ClientConfig,
    session: Option<Session>,
) -> Result<(Client, Events, ConnAck), ConnectError> {
    #[cfg(feature = "quic")]
    if let Some(opened) = connector.open_quic().await {
        let links = Links::quic(opened?, connector.endpoint().quic.data_streams);
        return connect_links(links, config, session, None).await;
    }
    let stream = connector.open().await?;
    connect(stream, config, session).await
}

/// Runs the MQTT handshake over `stream` and spawns the connection's task.
pub async fn connect<S>(
    stream: S,
    config: ClientConfig,
    session: Option<Session>,
) -> Result<(Client, Events, ConnAck), ConnectError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    connect_with_auth(stream, config, session, None).await
}

/// As [`connect`], authenticating with an enhanced-authentication method.
pub async fn connect_with_auth<S>(
    stream: S,
    config: ClientConfig,
    session: Option<Session>,
    authenticator: Option<Box<dyn Authenticator>>,
) -> Result<(Client, Events, ConnAck), ConnectError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    connect_links(Links::single(stream), config, session, authenticator).await
}

async fn connect_links(
    links: Links,
    mut config: ClientConfig,
    session: Option<Session>,
    mut authenticator: Option<Box<dyn Authenticator>>,
) -> Result<(Client, Events, ConnAck), ConnectError> {
    if let Some(auth) = authenticator.as_mut() {
        let method = MqttStr::try_from(auth.method())
            .map_err(|e| AuthFailed(format!("method name: {e}")))?;
        config.authentication = Some((method, auth.start()?));
    }
    let conn = ClientConnection::new(config, session, Instant::now());
    #[cfg(feature = "quic")]
    let quic = links.quic.as_ref().map(|q| q.info.clone());
    let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let (event_tx, mut event_rx) = mpsc::channel(EVENT_QUEUE);
    let mut driver = Driver::new(conn, command_rx, event_tx);
    driver.authenticator = authenticator;
    let (error_tx, mut error_rx) = oneshot::channel();
    driver.transport_error = Some(error_tx);
    let (session_tx, session) = oneshot::channel();
    driver.session_reply = Some(session_tx);
    tokio::spawn(driver.run(links));
    loop {
        match event_rx.recv().await {
            Some(Event::Connected(ack)) => {
                let client = Client {
                    commands,
                    #[cfg(feature = "quic")]
                    quic,
                };
                let events = Events {
                    rx: event_rx,
                    session,
                };
                return Ok((client, events, ack));
            }
            Some(Event::Rejected(ack)) => return Err(ConnectError::Refused(Box::new(ack))),
            // The driver hands over the transport's error before it reports the end.
            Some(Event::Closed { reason, .. }) => {
                return Err(match error_rx.try_recv() {
                    Ok(error) => lost(error),
                    Err(_) => ConnectError::Closed(reason),
                });
            }
            Some(_) => {}
            None => return Err(ConnectError::Closed(ReasonCode::UnspecifiedError)),
        }
    }
}

/// A transport failure before CONNACK: the transport's own error if it carries one (a QUIC
/// handshake that failed or timed out after 0-RTT data went out), else the I/O error.
fn lost(error: std::io::Error) -> ConnectError {
    if error
        .get_ref()
        .is_some_and(|inner| inner.is::<TransportError>())
    {
        if let Some(Ok(transport)) = error.into_inner().map(|e| e.downcast::<TransportError>()) {
            return ConnectError::Transport(*transport);
        }
        return ConnectError::Closed(ReasonCode::UnspecifiedError);
    }
    ConnectError::Lost(error)
}

/// Commands waiting for the connection task; senders wait beyond this.
const COMMAND_QUEUE: usize = 1024;
/// Events waiting for the application; beyond this the connection stops reading.
pub const EVENT_QUEUE: usize = 1024;
/// Output waiting beyond this many bytes stops the task taking commands.
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// The longest the streams' shutdown may wait for the server to receive the last bytes.
const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// The reading side of one stream: its input buffer and packet reader.
struct Input {
    stream: StreamId,
    rd: Box<dyn AsyncRead + Send + Unpin>,
    rbuf: BytesMut,
    reader: PacketReader,
    /// False once input ended or failed.
    open: bool,
}

/// The writing side of one stream: its output buffer.
struct Output {
    stream: StreamId,
    wr: Box<dyn AsyncWrite + Send + Unpin>,
    wbuf: BytesMut,
    /// False once output failed; its packets go on the control stream.
    open: bool,
}

/// The reading sides, the control stream's first; read in turn, so that none starves the
/// others.
struct Inputs {
    links: Vec<Input>,
    next: usize,
}

/// The writing sides, in the same order as the reading sides.
struct Outputs {
    links: Vec<Output>,
    next: usize,
}

/// The streams of a connection: the control stream, then data streams (multi-stream QUIC).
struct Links {
    input: Inputs,
    output: Outputs,
    /// The readers' limit: the client's maximum packet size.
    max_packet_size: u32,
    #[cfg(feature = "quic")]
    quic: Option<QuicLinks>,
}

/// The QUIC connection behind the links.
#[cfg(feature = "quic")]
struct QuicLinks {
    conn: transport::QuicConn,
    info: Arc<QuicInfo>,
    /// Data streams to open once connected; 0 after they were.
    to_open: u16,
    /// The data streams that are open, for the topic hash to pick from.
    data: Vec<StreamId>,
}

impl Links {
    fn single<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(stream: S) -> Self {
        let (rd, wr) = tokio::io::split(stream);
        let mut links = Self {
            input: Inputs {
                links: Vec::new(),
                next: 0,
            },
            output: Outputs {
                links: Vec::new(),
                next: 0,
            },
            max_packet_size: 0,
            #[cfg(feature = "quic")]
            quic: None,
        };
        links.push(StreamId::CONTROL, Box::new(rd), Box::new(wr));
        links
    }

    #[cfg(feature = "quic")]
    fn quic(opened: transport::QuicConnection, data_streams: u16) -> Self {
        let mut links = Self::single(opened.control);
        links.quic = Some(QuicLinks {
            conn: opened.conn,
            info: opened.info,
            to_open: data_streams,
            data: Vec::new(),
        });
        links
    }

    fn push(
        &mut self,
        stream: StreamId,
        rd: Box<dyn AsyncRead + Send + Unpin>,
        wr: Box<dyn AsyncWrite + Send + Unpin>,
    ) {
        self.input.links.push(Input {
            stream,
            rd,
            rbuf: BytesMut::with_capacity(16 * 1024),
            reader: PacketReader::new(self.max_packet_size),
            open: true,
        });
        self.output.links.push(Output {
            stream,
            wr,
            wbuf: BytesMut::new(),
            open: true,
        });
    }

    /// Sets the packet readers' limit (the client's maximum packet size).
    fn set_max_packet_size(&mut self, max: u32) {
        self.max_packet_size = max;
        for link in &mut self.input.links {
            link.reader = PacketReader::new(max);
        }
    }

    /// The stream a PUBLISH on `topic` (or a SUBSCRIBE whose first filter is `topic`) goes on.
    fn stream_for(&self, topic: &str) -> StreamId {
        #[cfg(feature = "quic")]
        if let Some(q) = &self.quic {
            if !q.data.is_empty() {
                let i = fnv1a(topic.as_bytes()) % q.data.len() as u64;
                return q.data.get(i as usize).copied().unwrap_or(StreamId::CONTROL);
            }
        }
        let _ = topic;
        StreamId::CONTROL
    }

    /// Stream `i` is gone both ways; its unwritten output is dropped (the protocol core
    /// resends what matters on the control stream).
    fn lose(&mut self, i: usize) -> Option<StreamId> {
        let input = self.input.links.get_mut(i)?;
        input.open = false;
        let stream = input.stream;
        if let Some(output) = self.output.links.get_mut(i) {
            output.open = false;
            output.wbuf = BytesMut::new();
        }
        #[cfg(feature = "quic")]
        if let Some(q) = &mut self.quic {
            q.data.retain(|s| *s != stream);
        }
        Some(stream)
    }

    /// Writes what is left, data streams before the control stream (whose DISCONNECT comes
    /// last), then shuts the streams down: a QUIC stream's shutdown waits until the server
    /// has received everything, at most [`CLOSE_LINGER`] in all. Then the QUIC connection
    /// closes.
    async fn close(&mut self) {
        for link in self.output.links.iter_mut().rev().filter(|l| l.open) {
            let _ = link.wr.write_all(&link.wbuf).await;
            link.wbuf.clear();
        }
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            for link in self.output.links.iter_mut().rev().filter(|l| l.open) {
                let _ = link.wr.shutdown().await;
            }
        })
        .await;
        #[cfg(feature = "quic")]
        if let Some(q) = &self.quic {
            transport::quic_close(&q.conn);
        }
        self.input.links.clear();
        self.output.links.clear();
    }
}

impl Inputs {
    /// Reads into one stream's input buffer: that stream's index and the read's result.
    /// Cancel-safe: a read either completed in the poll that returned it or did not happen.
    async fn read(&mut self) -> (usize, std::io::Result<usize>) {
        std::future::poll_fn(|cx| {
            let n = self.links.len();
            for k in 0..n {
                let i = (self.next + k) % n;
                let Some(link) = self.links.get_mut(i).filter(|l| l.open) else {
                    continue;
                };
                if let Poll::Ready(result) = pin!(link.rd.read_buf(&mut link.rbuf)).poll(cx) {
                    self.next = (i + 1) % n;
                    return Poll::Ready((i, result));
                }
            }
            Poll::Pending
        })
        .await
    }
}

impl Outputs {
    /// Encodes `packet` into the output of `stream` (of the control stream if that one is
    /// gone).
    fn queue(&mut self, stream: StreamId, packet: &Packet, version: ProtocolVersion) {
        let i = self
            .links
            .iter()
            .position(|l| l.stream == stream && l.open)
            .unwrap_or(0);
        if let Some(link) = self.links.get_mut(i) {
            let _ = packet.encode(version, &mut link.wbuf);
        }
    }

    /// Bytes waiting to be written, over all streams.
    fn backlog(&self) -> usize {
        self.links.iter().map(|l| l.wbuf.len()).sum()
    }

    fn is_empty(&self) -> bool {
        self.links.iter().all(|l| !l.open || l.wbuf.is_empty())
    }

    /// Writes some output of one stream: that stream's index and the write's result.
    /// Cancel-safe like [`Inputs::read`].
    async fn write(&mut self) -> (usize, std::io::Result<usize>) {
        std::future::poll_fn(|cx| {
            let n = self.links.len();
            for k in 0..n {
                let i = (self.next + k) % n;
                let Some(link) = self
                    .links
                    .get_mut(i)
                    .filter(|l| l.open && !l.wbuf.is_empty())
                else {
                    continue;
                };
                if let Poll::Ready(result) = pin!(link.wr.write_buf(&mut link.wbuf)).poll(cx) {
                    self.next = (i + 1) % n;
                    return Poll::Ready((i, result));
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// FNV-1a: a stable hash, so that a topic keeps its stream from run to run.
#[cfg(feature = "quic")]
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct Driver {
    conn: ClientConnection,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    /// An event the full stream could not take; nothing is read or reported until it goes.
    stalled: Option<Event>,
    pending_sub: HashMap<PacketId, oneshot::Sender<Result<SubAck, ClientError>>>,
    pending_unsub: HashMap<PacketId, oneshot::Sender<Result<UnsubAck, ClientError>>>,
    disconnect_reply: Option<oneshot::Sender<Option<Session>>>,
    /// Where the session goes at the end if no DISCONNECT call took it ([`Events::into_session`]).
    session_reply: Option<oneshot::Sender<Option<Session>>>,
    authenticator: Option<Box<dyn Authenticator>>,
    /// Takes the first transport error, for [`connect`] to report a failure before CONNACK.
    transport_error: Option<oneshot::Sender<std::io::Error>>,
}

impl Driver {
    fn new(
        conn: ClientConnection,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
    ) -> Self {
        Self {
            conn,
            commands,
            events,
            stalled: None,
            pending_sub: HashMap::new(),
            pending_unsub: HashMap::new(),
            disconnect_reply: None,
            session_reply: None,
            authenticator: None,
            transport_error: None,
        }
    }

    async fn run(mut self, mut links: Links) {
        links.set_max_packet_size(self.conn.max_packet_size());
        // Waits for room in the stream without borrowing `self`.
        let events = self.events.clone();
        loop {
            // Events first: answering one (an AUTH challenge) can queue packets.
            self.dispatch_events();
            #[cfg(feature = "quic")]
            self.open_data_streams(&mut links).await;
            let now = Instant::now();
            let version = self.conn.version();
            while let Some((stream, packet)) = self.conn.poll_transmit_tagged(now) {
                links.output.queue(stream, &packet, version);
            }
            if self.conn.is_closed() {
                links.close().await;
                break;
            }
            let deadline = self
                .conn
                .poll_timeout()
                .map(|t| tokio::time::Instant::now() + t.saturating_duration_since(Instant::now()));
            // While the application is behind, the server's input waits in the socket.
            let reading = self.stalled.is_none();
            let writing = !links.output.is_empty();
            let backlog = links.output.backlog();
            tokio::select! {
                biased;
                permit = events.reserve(), if !reading => {
                    let event = self.stalled.take();
                    if let (Ok(permit), Some(event)) = (permit, event) {
                        permit.send(event);
                    }
                }
                (i, res) = links.output.write(), if writing => match res {
                    Ok(n) if n > 0 => {}
                    Ok(_) => self.link_failed(&mut links, i, None),
                    Err(e) => self.link_failed(&mut links, i, Some(e)),
                },
                command = self.commands.recv(), if backlog < WRITE_HIGH_WATER => match command {
                    Some(command) => self.command(&links, command),
                    // Every handle is gone: nobody can use the connection any more.
                    None => self.conn.disconnect(Instant::now(), ReasonCode::Success, None),
                },
                (i, res) = links.input.read(), if reading => match res {
                    Ok(0) => self.link_failed(&mut links, i, None),
                    Err(e) => self.link_failed(&mut links, i, Some(e)),
                    Ok(_) => self.decode(&mut links, i),
                },
                // A PINGRESP may be among the unread input: no timeouts while not reading.
                _ = sleep_until(deadline), if deadline.is_some() && reading => {
                    self.conn.handle_timeout(Instant::now());
                }
            }
        }
        // The transport is closed and a DISCONNECT call returns now; the last events
        // ([`Event::Closed`] among them) then wait for room rather than be lost.
        drop(links);
        if let Some(reply) = self.disconnect_reply.take().or(self.session_reply.take()) {
            let _ = reply.send(self.conn.take_session());
        }
        loop {
            if let Some(event) = self.stalled.take() {
                let _ = self.events.send(event).await;
            }
            self.dispatch_events();
            if self.stalled.is_none() {
                return;
            }
        }
    }

    /// Hands the complete packets in stream `i`'s input to the state machine.
    fn decode(&mut self, links: &mut Links, i: usize) {
        let Some(link) = links.input.links.get_mut(i) else {
            return;
        };
        loop {
            match link.reader.read(&mut link.rbuf, Some(self.conn.version())) {
                Ok(Some(packet)) => self
                    .conn
                    .handle_packet_on(Instant::now(), link.stream, packet),
                Ok(None) => break,
                Err(e) => {
                    self.conn.handle_decode_error(Instant::now(), &e);
                    break;
                }
            }
        }
    }

    /// Stream `i` ended (`None`) or failed: the control stream's end is the connection's; a
    /// data stream's hands what it owed to the control stream.
    fn link_failed(&mut self, links: &mut Links, i: usize, error: Option<std::io::Error>) {
        if i == 0 {
            match error {
                Some(e) => self.transport_failed(e),
                None => self.conn.connection_lost(Instant::now()),
            }
            return;
        }
        if let Some(stream) = links.lose(i) {
            tracing::debug!(%stream, ?error, "data stream lost");
            self.conn.stream_lost(Instant::now(), stream);
        }
    }

    /// Once connected, opens the data streams of multi-stream QUIC; a server that allows
    /// fewer gets fewer (the rest of the traffic stays on the streams that opened).
    #[cfg(feature = "quic")]
    async fn open_data_streams(&mut self, links: &mut Links) {
        /// How long to wait for the server's stream credit.
        const OPEN_TIMEOUT: Duration = Duration::from_secs(2);
        let Some(q) = &mut links.quic else {
            return;
        };
        if q.to_open == 0 || !self.conn.is_connected() {
            return;
        }
        let wanted = std::mem::take(&mut q.to_open);
        let conn = q.conn.clone();
        for n in 1..=wanted {
            let opened = tokio::time::timeout(OPEN_TIMEOUT, transport::open_data_stream(&conn));
            match opened.await {
                Ok(Ok((send, recv))) => {
                    let stream = StreamId::new(u64::from(n));
                    links.push(stream, Box::new(recv), Box::new(send));
                    if let Some(q) = &mut links.quic {
                        q.data.push(stream);
                    }
                    self.conn.stream_opened(stream);
                }
                Ok(Err(e)) => {
                    tracing::warn!(
                        opened = n - 1,
                        wanted,
                        "cannot open a QUIC data stream: {e}"
                    );
                    break;
                }
                Err(_) => {
                    tracing::warn!(
                        opened = n - 1,
                        wanted,
                        "the server allows no more QUIC streams"
                    );
                    break;
                }
            }
        }
    }

    fn command(&mut self, links: &Links, command: Command) {
        let now = Instant::now();
        match command {
            Command::Publish(message, reply) => {
                let stream = links.stream_for(message.topic.as_str());
                let _ = reply.send(self.conn.publish_on(now, stream, message));
            }
            Command::PublishNoReply(message) => {
                let stream = links.stream_for(message.topic.as_str());
                let _ = self.conn.publish_on(now, stream, message);
            }
            Command::Subscribe(filters, properties, reply) => {
                let first = filters.first().map_or("", |s| s.filter.as_str());
                let stream = links.stream_for(first);
                match self.conn.subscribe_on(stream, filters, properties) {
                    Ok(id) => {
                        self.pending_sub.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Unsubscribe(filters, reply) => match self.conn.unsubscribe_on(
                links.stream_for(filters.first().map_or("", |f| f.as_str())),
                filters,
            ) {
                Ok(id) => {
                    self.pending_unsub.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Ack(id, reason) => {
                let _ = self.conn.ack(id, reason);
            }
            Command::Disconnect(reason, expiry, reply) => {
                self.disconnect_reply = Some(reply);
                self.conn.disconnect(now, reason, expiry);
            }
            Command::Reauthenticate => {
                let Some(Ok(data)) = self.authenticator.as_mut().map(|a| a.start()) else {
                    return self.auth_failed(now);
                };
                if self.conn.reauthenticate(data).is_err() {
                    self.auth_failed(now);
                }
            }
        }
    }

    fn transport_failed(&mut self, error: std::io::Error) {
        if let Some(tx) = self.transport_error.take() {
            let _ = tx.send(error);
        }
        self.conn.connection_lost(Instant::now());
    }

    fn auth_failed(&mut self, now: Instant) {
        self.conn.disconnect(now, ReasonCode::NotAuthorized, None);
    }

    /// Hands an event to the application, or holds it (and stops reading) if the stream is
    /// full.
    fn emit(&mut self, event: Event) {
        if let Err(mpsc::error::TrySendError::Full(event)) = self.events.try_send(event) {
            self.stalled = Some(event);
        }
    }

    /// Handles the state machine's events until one waits for room in the stream.
    fn dispatch_events(&mut self) {
        while self.stalled.is_none() {
            let Some(event) = self.conn.poll_event() else {
                return;
            };
            match event {
                Event::SubAck(ack) => {
                    if let Some(reply) = self.pending_sub.remove(&ack.packet_id) {
                        let _ = reply.send(Ok(ack));
                    }
                }
                Event::UnsubAck(ack) => {
                    if let Some(reply) = self.pending_unsub.remove(&ack.packet_id) {
                        let _ = reply.send(Ok(ack));
                    }
                }
                Event::AuthChallenge { data } => {
                    let answer = match self.authenticator.as_mut() {
                        Some(auth) => auth.challenge(data),
                        None => Err(AuthFailed("no authenticator".into())),
                    };
                    match answer {
                        Ok(data) => {
                            let _ = self.conn.auth_continue(data);
                        }
                        Err(_) => self.auth_failed(Instant::now()),
                    }
                }
                Event::Connected(ack) if self.authenticator.is_some() => {
                    let data = ack.properties.authentication_data.clone();
                    if let Some(auth) = self.authenticator.as_mut() {
                        if auth.finish(data).is_err() {
                            self.auth_failed(Instant::now());
                            continue;
                        }
                    }
                    self.emit(Event::Connected(ack));
                }
                Event::ReAuthenticated { data } => {
                    let ok = self
                        .authenticator
                        .as_mut()
                        .is_some_and(|a| a.finish(data.clone()).is_ok());
                    if ok {
                        self.emit(Event::ReAuthenticated { data });
                    } else {
                        self.auth_failed(Instant::now());
                    }
                }
                other => self.emit(other),
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
