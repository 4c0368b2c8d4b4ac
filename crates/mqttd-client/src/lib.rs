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
//! feature `ws`) or both; [`connect_to`] opens one and connects over it.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use mqttd_proto::client::{ClientConfig, ClientConnection, ClientError, Event};
use mqttd_proto::codec::PacketReader;
use mqttd_proto::session::{Enqueued, Session};
pub mod transport;

pub use transport::{
    Connector, Endpoint, ServerUrl, TlsOptions, TlsVersion, Transport, TransportError,
};

use mqttd_proto::{
    ConnAck, Message, MqttStr, PacketId, QoS, ReasonCode, SubAck, SubscribeProperties,
    Subscription, SubscriptionOptions, TopicFilter, UnsubAck,
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
}

/// Everything the server sends that is not the answer to a call: messages, delivery
/// confirmations, and finally [`Event::Closed`]. At most [`EVENT_QUEUE`] events wait here;
/// while they do, the connection stops reading from the server.
pub struct Events {
    rx: mpsc::Receiver<Event>,
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
    mut config: ClientConfig,
    session: Option<Session>,
    mut authenticator: Option<Box<dyn Authenticator>>,
) -> Result<(Client, Events, ConnAck), ConnectError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    if let Some(auth) = authenticator.as_mut() {
        let method = MqttStr::try_from(auth.method())
            .map_err(|e| AuthFailed(format!("method name: {e}")))?;
        config.authentication = Some((method, auth.start()?));
    }
    let conn = ClientConnection::new(config, session, Instant::now());
    let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let (event_tx, mut event_rx) = mpsc::channel(EVENT_QUEUE);
    let mut driver = Driver::new(conn, command_rx, event_tx);
    driver.authenticator = authenticator;
    let (error_tx, mut error_rx) = oneshot::channel();
    driver.transport_error = Some(error_tx);
    tokio::spawn(driver.run(stream));
    loop {
        match event_rx.recv().await {
            Some(Event::Connected(ack)) => {
                return Ok((Client { commands }, Events { rx: event_rx }, ack));
            }
            Some(Event::Rejected(ack)) => return Err(ConnectError::Refused(Box::new(ack))),
            // The driver hands over the transport's error before it reports the end.
            Some(Event::Closed { reason, .. }) => {
                return Err(match error_rx.try_recv() {
                    Ok(error) => ConnectError::Lost(error),
                    Err(_) => ConnectError::Closed(reason),
                });
            }
            Some(_) => {}
            None => return Err(ConnectError::Closed(ReasonCode::UnspecifiedError)),
        }
    }
}

/// Commands waiting for the connection task; senders wait beyond this.
const COMMAND_QUEUE: usize = 1024;
/// Events waiting for the application; beyond this the connection stops reading.
pub const EVENT_QUEUE: usize = 1024;
/// Output waiting beyond this many bytes stops the task taking commands.
const WRITE_HIGH_WATER: usize = 256 * 1024;

struct Driver {
    conn: ClientConnection,
    reader: PacketReader,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    /// An event the full stream could not take; nothing is read or reported until it goes.
    stalled: Option<Event>,
    pending_sub: HashMap<PacketId, oneshot::Sender<Result<SubAck, ClientError>>>,
    pending_unsub: HashMap<PacketId, oneshot::Sender<Result<UnsubAck, ClientError>>>,
    disconnect_reply: Option<oneshot::Sender<Option<Session>>>,
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
        let reader = PacketReader::new(conn.max_packet_size());
        Self {
            conn,
            reader,
            commands,
            events,
            stalled: None,
            pending_sub: HashMap::new(),
            pending_unsub: HashMap::new(),
            disconnect_reply: None,
            authenticator: None,
            transport_error: None,
        }
    }

    async fn run<S: AsyncRead + AsyncWrite + Unpin>(mut self, stream: S) {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut rbuf = BytesMut::with_capacity(16 * 1024);
        let mut wbuf = BytesMut::new();
        // Waits for room in the stream without borrowing `self`.
        let events = self.events.clone();
        loop {
            // Events first: answering one (an AUTH challenge) can queue packets.
            self.dispatch_events();
            let now = Instant::now();
            while let Some(packet) = self.conn.poll_transmit(now) {
                let _ = packet.encode(self.conn.version(), &mut wbuf);
            }
            if self.conn.is_closed() {
                let _ = wr.write_all(&wbuf).await;
                let _ = wr.shutdown().await;
                break;
            }
            let deadline = self
                .conn
                .poll_timeout()
                .map(|t| tokio::time::Instant::now() + t.saturating_duration_since(Instant::now()));
            // While the application is behind, the server's input waits in the socket.
            let reading = self.stalled.is_none();
            tokio::select! {
                biased;
                permit = events.reserve(), if !reading => {
                    let event = self.stalled.take();
                    if let (Ok(permit), Some(event)) = (permit, event) {
                        permit.send(event);
                    }
                }
                res = wr.write_buf(&mut wbuf), if !wbuf.is_empty() => match res {
                    Ok(n) if n > 0 => {}
                    Ok(_) => self.conn.connection_lost(Instant::now()),
                    Err(e) => self.transport_failed(e),
                },
                command = self.commands.recv(), if wbuf.len() < WRITE_HIGH_WATER => match command {
                    Some(command) => self.command(command),
                    // Every handle is gone: nobody can use the connection any more.
                    None => self.conn.disconnect(Instant::now(), ReasonCode::Success, None),
                },
                res = rd.read_buf(&mut rbuf), if reading => match res {
                    Ok(0) => self.conn.connection_lost(Instant::now()),
                    Err(e) => self.transport_failed(e),
                    Ok(_) => loop {
                        match self.reader.read(&mut rbuf, Some(self.conn.version())) {
                            Ok(Some(packet)) => self.conn.handle_packet(Instant::now(), packet),
                            Ok(None) => break,
                            Err(e) => {
                                self.conn.handle_decode_error(Instant::now(), &e);
                                break;
                            }
                        }
                    },
                },
                // A PINGRESP may be among the unread input: no timeouts while not reading.
                _ = sleep_until(deadline), if deadline.is_some() && reading => {
                    self.conn.handle_timeout(Instant::now());
                }
            }
        }
        // The transport closes and a DISCONNECT call returns now; the last events
        // ([`Event::Closed`] among them) then wait for room rather than be lost.
        drop((rd, wr));
        if let Some(reply) = self.disconnect_reply.take() {
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

    fn command(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Publish(message, reply) => {
                let _ = reply.send(self.conn.publish(now, message));
            }
            Command::PublishNoReply(message) => {
                let _ = self.conn.publish(now, message);
            }
            Command::Subscribe(filters, properties, reply) => {
                match self.conn.subscribe(filters, properties) {
                    Ok(id) => {
                        self.pending_sub.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Unsubscribe(filters, reply) => match self.conn.unsubscribe(filters) {
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
