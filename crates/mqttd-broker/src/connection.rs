//! The driver of one client connection: a task that moves bytes between a transport and the
//! protocol state machine, and carries out what the machine asks of the broker.
//!
//! The task waits, in priority order, for shutdown, control requests (takeover), room to
//! write, bytes to read, messages routed to its session, and the machine's next timer. Reading
//! pauses while too much output is waiting, so a client that does not read cannot make the
//! broker buffer without bound. Publishers feeding such a client pause too: a QoS 0 or 1
//! publication that finds the client's output backed up or its queue full waits, with the
//! publisher's reading paused, until there is room, so that under overload the broker reads
//! no faster than it can deliver. A client that makes no progress at all for
//! `BACKPRESSURE_WAIT` is marked stalled; from then on what is routed to it is dropped (and
//! counted) until it reads again.
//!
//! Persist, then acknowledge: a packet that depends on a change to durable state (PUBACK after
//! a message was stored, SUBACK after a subscription was, PUBREL after a QoS 2 state change, a
//! PUBLISH of a stored message) is encoded at once but written only when the storage's
//! watermark passes the change. Meanwhile the connection goes on reading, so many messages
//! share one sync.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use mqttd_proto::codec::PacketReader;
use mqttd_proto::server::{Accept, ConnectRequest, Event, ServerConnection};
use mqttd_proto::session::{Enqueued, OutboundState, Session};
use mqttd_proto::{
    Delivery, InboundPublish, Message, MqttStr, ProtocolVersion, QoS, ReasonCode, Subscribe,
    SubscriptionOptions, Unsubscribe,
};

use crate::auth::scram::MECHANISM;
use crate::auth::ScramServerFirstSent;
use crate::broker::{
    update_flag, Blocked, Headed, Inner, Mailbox, SessionHandle, Slot, Subscriber,
};
use crate::hooks::{Action, ClientInfo, ConnectAttempt, Intercept, Peer};
use crate::retained::RetainedCursor;
use crate::storage::{Batch, StoredWill, Ticket, Watermark};

/// Output waiting beyond this many bytes pauses reading and makes publishers of QoS 0
/// messages for this client wait (see `SessionHandle::congested`).
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// Publishers held back by this client's output resume once it is below this many bytes.
const WRITE_LOW_WATER: usize = 64 * 1024;
/// Output waiting beyond this many bytes drops QoS 0 deliveries: what the mailbox held when
/// the publishers started to wait lands between the two marks.
const QOS0_DROP_AT: usize = 4 * WRITE_HIGH_WATER;
/// Smallest read buffer: what an idle connection holds while it waits.
const MIN_READ: usize = 256;
/// Largest read buffer a busy connection grows to.
const MAX_READ: usize = 64 * 1024;
/// How long a publication waits for room in a subscriber queue or output that makes no
/// progress before the message is dropped for that subscriber (which is then marked stalled).
/// Meanwhile the publisher is not read from, so a subscriber that is slow but reading sets the
/// pace instead of losing messages, while one that stopped reading holds its publishers up
/// only this long. Long enough that a reader starved of CPU on a busy machine is not taken for
/// a stopped one (at 25 ms, four raw publishers on a loaded two-core machine made the broker
/// drop 98% for a subscriber that was reading).
const BACKPRESSURE_WAIT: std::time::Duration = std::time::Duration::from_millis(250);
/// How long, after the broker ended a connection (DISCONNECT, a refusing CONNACK, a timeout),
/// it goes on reading and discarding what the client still sends, unless the client closes
/// its end first. Closing a socket with unread input makes the kernel reset the connection,
/// which fails the client's writes and can discard the answer it has not read yet; reading
/// until the client has seen the close lets it learn why.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
/// The buffer input is discarded through while lingering: all a lingering connection holds.
const LINGER_BUF: usize = 2048;

/// Runs a connection to completion.
pub(crate) async fn serve<S>(inner: Arc<Inner>, stream: S, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let span = tracing::info_span!(
        "conn",
        peer = %peer.addr,
        listener = %peer.listener,
        transport = %peer.transport,
        client_id = tracing::field::Empty,
    );
    inner.metrics.connections_open.inc();
    let mut task = Connection::new(inner.clone(), peer);
    let rest = task.run(stream).instrument(span).await;
    // Nothing of the connection but its socket stays while it lingers.
    drop(task);
    if let Some(stream) = rest {
        linger(stream, &inner.shutdown).await;
    }
    inner.metrics.connections_open.dec();
}

/// Reads and discards the client's input after the broker ended the connection and shut down
/// its side, until the client closes its end, [`LINGER`] passes, or the broker shuts down.
async fn linger<S: AsyncRead + Unpin>(mut stream: S, shutdown: &CancellationToken) {
    let mut buf = vec![0; LINGER_BUF];
    let discard = async { while let Ok(1..) = stream.read(&mut buf).await {} };
    tokio::select! {
        _ = discard => {}
        _ = tokio::time::sleep(LINGER) => {}
        _ = shutdown.cancelled() => {}
    }
}

struct Connection {
    inner: Arc<Inner>,
    peer: Peer,
    conn: ServerConnection,
    reader: PacketReader,
    wbuf: BytesMut,
    mailbox: Arc<Mailbox>,
    handle: Option<Arc<SessionHandle>>,
    client: Option<Box<ClientInfo>>,
    takeover_reply: Option<oneshot::Sender<Option<Session>>>,
    /// A SCRAM exchange waiting for the client's final message.
    scram: Option<Box<PendingScram>>,
    /// The identity SCRAM established, which stands in for the user name.
    scram_user: Option<MqttStr>,
    /// A session acquired for a connection that closed before CONNACK.
    unaccepted: Option<Box<Session>>,
    /// The client's will, kept with its session record in storage.
    will: Option<Box<StoredWill>>,
    /// The latest storage change that output must wait for.
    needs: Ticket,
    /// Output waiting for storage; created the first time some does.
    gate: Option<Box<Gate>>,
    /// A publication waiting for room in subscriber queues or output before it is
    /// acknowledged and the publisher is read from again.
    blocked: Option<Box<BlockedPublish>>,
    /// Retained messages for new subscriptions still to send, at the pace the client reads.
    retained: Option<Box<RetainedFeed>>,
    /// Whether the client ended the connection (DISCONNECT, or its transport closed).
    closed_by_client: bool,
}

/// Retained messages being sent for new subscriptions, from snapshots of the store, as the
/// client makes room for them. Messages routed to the session meanwhile wait behind them, so
/// that a retained message never arrives after a newer one on its topic.
struct RetainedFeed {
    /// One per subscription that asked for retained messages, in order, followed by the
    /// messages routed meanwhile.
    cursors: VecDeque<(RetainedCursor, SubscriptionOptions, Option<NonZeroU32>)>,
    /// The next one, taken from a cursor but not yet sent for lack of room.
    next: Option<Delivery>,
    /// Messages routed to the session meanwhile, in arrival order.
    deferred: VecDeque<Delivery>,
}

impl RetainedFeed {
    fn next(&mut self, now: Instant) -> Option<Delivery> {
        if let Some(d) = self.next.take() {
            return Some(d);
        }
        while let Some((cursor, options, id)) = self.cursors.front_mut() {
            if let Some(message) = cursor.next(now) {
                return Some(Delivery {
                    qos: message.qos.min(options.qos),
                    retain: true,
                    subscription_ids: id.iter().copied().collect(),
                    shared: None,
                    store_seq: None,
                    message,
                });
            }
            self.cursors.pop_front();
        }
        None
    }
}

/// A publication waiting for room in subscriber queues or output, with the publisher's
/// reading paused meanwhile.
struct BlockedPublish {
    /// Its packet identifier, to acknowledge once it is handed over; none for QoS 0.
    packet_id: Option<mqttd_proto::PacketId>,
    reason: ReasonCode,
    deliveries: Blocked,
    /// When the sessions waited for last made progress.
    since: Instant,
    /// Their progress counters, summed, as of `since`.
    progress: u64,
    /// Publications that arrived meanwhile (already read with it): they are routed after it,
    /// in order.
    later: VecDeque<InboundPublish>,
}

/// Output held back until storage is durable up to a change.
struct Gate {
    watermark: watch::Receiver<Watermark>,
    /// From which stream offset output waits for which change, oldest first.
    holds: VecDeque<(u64, Ticket)>,
    /// Stream offset of the first byte in the write buffer.
    base: u64,
    /// Messages routed to this session that wait for their storage change to be durable
    /// before the session takes them: (change, messages), in arrival order.
    awaiting: VecDeque<(Ticket, VecDeque<Delivery>)>,
    /// Messages in `awaiting`.
    awaiting_len: usize,
    /// Stream offset just past a CONNACK that was held: until output passes it, the client
    /// has not been told it is connected.
    connack_end: Option<u64>,
}

impl Gate {
    fn new(mut watermark: watch::Receiver<Watermark>) -> Box<Self> {
        // Looked at once even if it never moves again: storage may already have failed.
        watermark.mark_changed();
        Box::new(Self {
            watermark,
            holds: VecDeque::new(),
            base: 0,
            awaiting: VecDeque::new(),
            awaiting_len: 0,
            connack_end: None,
        })
    }

    /// The messages whose changes are now durable, oldest first.
    fn durable_deliveries(&mut self) -> Vec<Delivery> {
        let watermark = *self.watermark.borrow();
        let mut out = Vec::new();
        while self
            .awaiting
            .front()
            .is_some_and(|(t, _)| watermark.covers(*t))
        {
            if let Some((_, batch)) = self.awaiting.pop_front() {
                self.awaiting_len -= batch.len();
                out.extend(batch);
            }
        }
        out
    }

    /// Releases the output the watermark now covers; false if storage failed while something
    /// still waits for it.
    fn release(&mut self) -> bool {
        let w = *self.watermark.borrow_and_update();
        while self.holds.front().is_some_and(|&(_, t)| w.covers(t)) {
            self.holds.pop_front();
        }
        // Output or messages that wait for a change storage will never make durable would
        // wait for ever: the connection must close instead.
        let stuck = self.awaiting.front().is_some_and(|(t, _)| !w.covers(*t));
        !w.failed || (self.holds.is_empty() && !stuck)
    }

    /// How much of a write buffer of `len` bytes may be written.
    fn writable(&self, len: usize) -> usize {
        match self.holds.front() {
            Some(&(offset, _)) => (offset.saturating_sub(self.base) as usize).min(len),
            None => len,
        }
    }
}

/// Work on an event that has to wait for something.
enum Waiting {
    /// Authenticate, then acquire the session.
    Connect(ConnectRequest),
    /// The client's answer in a SCRAM exchange.
    AuthContinue(Option<bytes::Bytes>),
}

/// A SCRAM exchange in progress: at CONNECT (with the request to finish) or a re-authentication.
struct PendingScram {
    state: ScramServerFirstSent,
    connect: Option<ConnectRequest>,
}

impl Connection {
    fn new(inner: Arc<Inner>, peer: Peer) -> Self {
        let conn = ServerConnection::new(inner.server_config.clone(), Instant::now());
        let reader = PacketReader::new(conn.max_packet_size());
        Self {
            inner,
            peer,
            conn,
            reader,
            wbuf: BytesMut::new(),
            mailbox: Arc::default(),
            handle: None,
            client: None,
            takeover_reply: None,
            scram: None,
            scram_user: None,
            unaccepted: None,
            will: None,
            needs: Ticket::NONE,
            gate: None,
            blocked: None,
            retained: None,
            closed_by_client: false,
        }
    }

    /// Hands over what waited for room; acknowledges the publication once nothing waits.
    fn retry_blocked(&mut self, now: Instant) {
        let Some(b) = &mut self.blocked else {
            return;
        };
        let progress = progress_of(&b.deliveries);
        if progress != b.progress {
            b.progress = progress;
            b.since = now;
        }
        let give_up = now.saturating_duration_since(b.since) >= BACKPRESSURE_WAIT;
        let mut batch = Batch::direct(&*self.inner.storage);
        self.inner
            .retry_blocked(now, &mut b.deliveries, give_up, &mut batch);
        let done = b.deliveries.is_empty().then_some((b.packet_id, b.reason));
        let ticket = batch.commit();
        self.depends_on(ticket);
        if let Some((packet_id, reason)) = done {
            let later = self.blocked.take().map(|b| b.later).unwrap_or_default();
            if let Some(packet_id) = packet_id {
                let _ = self.conn.publish_ack(packet_id, reason);
            }
            for publish in later {
                self.on_publish(publish);
            }
        }
    }

    /// Output produced from now on waits until storage has made the change `ticket` stands
    /// for durable.
    fn depends_on(&mut self, ticket: Ticket) {
        if self.inner.durable {
            self.needs.merge(ticket);
        }
    }

    fn client_id(&self) -> Option<&mqttd_proto::ClientId> {
        self.handle.as_ref().map(|h| &h.client_id)
    }

    /// Bytes of the write buffer that may go out now.
    fn writable(&self) -> usize {
        self.gate
            .as_ref()
            .map_or(self.wbuf.len(), |g| g.writable(self.wbuf.len()))
    }

    /// Drives the connection until it closes; returns the stream, its writing side shut down,
    /// if the broker ended the connection, for the caller to [`linger`] on.
    async fn run<S>(&mut self, stream: S) -> Option<S>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut rbuf = BytesMut::new();
        let mut read_size = MIN_READ;
        let shutdown = self.inner.shutdown.clone();
        let mailbox = self.mailbox.clone();
        let mut shutting_down = false;
        loop {
            // Events first: what they record in storage decides which output must wait.
            self.process_events().await;
            self.feed_retained(Instant::now());
            self.flush_transmits();
            if self.conn.is_closed() {
                break;
            }
            let deadline = self
                .conn
                .poll_timeout()
                .map(|t| tokio::time::Instant::now() + t.saturating_duration_since(Instant::now()));
            let writable = self.writable();
            let writing = writable > 0;
            let holding = self.gate.as_ref().is_some_and(|g| !g.holds.is_empty());
            let awaiting = self.gate.as_ref().is_some_and(|g| g.awaiting_len > 0);
            let reading = self.wbuf.len() < WRITE_HIGH_WATER;
            if let Some(handle) = &self.handle {
                let (saturated, capacity) = self.conn.session().map_or((false, 0), |s| {
                    let limits = s.limits();
                    let window = usize::from(self.inner.config.max_inflight_messages);
                    let awaiting = self.gate.as_ref().map_or(0, |g| g.awaiting_len);
                    // While retained messages are being sent, routed ones wait behind them:
                    // that queue is the one that must have room.
                    let (queued, in_flight) = match &self.retained {
                        Some(feed) => (feed.deferred.len(), 0),
                        None => (s.queued().len(), s.in_flight_len().min(window)),
                    };
                    let used = queued + in_flight + awaiting;
                    (
                        queued >= limits.max_messages,
                        (limits.max_messages + window).saturating_sub(used),
                    )
                });
                // Hysteresis: publishers woken when the output drains have room for a good
                // batch each before it backs up again, instead of a few messages per wake-up.
                let limit = if handle.congested.load(std::sync::atomic::Ordering::Relaxed) {
                    WRITE_LOW_WATER
                } else {
                    WRITE_HIGH_WATER
                };
                handle.set_congested(self.wbuf.len() >= limit);
                handle.set_saturated(saturated);
                let before = handle.capacity.load(std::sync::atomic::Ordering::Relaxed);
                if before != capacity {
                    handle
                        .capacity
                        .store(capacity, std::sync::atomic::Ordering::Relaxed);
                    if capacity > before {
                        handle
                            .progress
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            let blocked_on = self
                .blocked
                .as_ref()
                .and_then(|b| b.deliveries.first().map(|(h, _)| h.clone()));
            let reading = reading && blocked_on.is_none();
            let mut gate = self.gate.take();
            if rbuf.capacity() - rbuf.len() < MIN_READ {
                rbuf.reserve(read_size);
            }
            let spare = rbuf.capacity() - rbuf.len();
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    self.conn.disconnect(Instant::now(), ReasonCode::ServerShuttingDown);
                }
                _ = mailbox.wait() => {
                    let inbox = self.mailbox.take();
                    if !inbox.deliveries.is_empty() {
                        // Publishers waiting for room in the mailbox see it move.
                        if let Some(handle) = &self.handle {
                            handle.progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    if let Some(reply) = inbox.takeover {
                        // What the client sent before the new connection came counts first:
                        // a DISCONNECT already here cancels the will and may end the session.
                        if reading {
                            Box::pin(self.read_available(&mut rd, &mut rbuf)).await;
                        }
                        self.takeover_reply = Some(reply);
                        self.conn.disconnect(Instant::now(), ReasonCode::SessionTakenOver);
                    }
                    let now = Instant::now();
                    // Stored messages enter the session once they are durable, so that what
                    // the session sends later never waits for newer changes.
                    let waits = self.inner.durable
                        && (!inbox.ticket.is_none() || gate.as_ref().is_some_and(|g| g.awaiting_len > 0));
                    if waits {
                        let g = gate.get_or_insert_with(|| Gate::new(self.inner.storage.watermark()));
                        g.awaiting_len += inbox.deliveries.len();
                        g.awaiting.push_back((inbox.ticket, inbox.deliveries));
                        for delivery in g.durable_deliveries() {
                            self.deliver(now, delivery);
                        }
                    } else {
                        for delivery in inbox.deliveries {
                            self.deliver(now, delivery);
                        }
                    }
                }
                res = wr.write(&self.wbuf[..writable]), if writing => match res {
                    Ok(0) | Err(_) => self.conn.connection_lost(Instant::now()),
                    Ok(n) => {
                        self.inner.metrics.bytes_sent.inc_by(n as u64);
                        if let Some(handle) = &self.handle {
                            handle.wrote(!reading);
                        }
                        bytes::Buf::advance(&mut self.wbuf, n);
                        if let Some(gate) = &mut gate {
                            gate.base += n as u64;
                        }
                        if self.wbuf.is_empty() {
                            // Hold no output buffer while there is nothing to send.
                            self.wbuf = BytesMut::new();
                            if wr.flush().await.is_err() {
                                self.conn.connection_lost(Instant::now());
                            }
                        }
                    }
                },
                res = rd.read_buf(&mut rbuf), if reading => match res {
                    Ok(0) | Err(_) => self.conn.connection_lost(Instant::now()),
                    Ok(n) => {
                        self.inner.metrics.bytes_received.inc_by(n as u64);
                        self.decode(&mut rbuf);
                        if n == spare {
                            // A busy connection: read more at a time.
                            read_size = (read_size * 2).min(MAX_READ);
                        } else if rbuf.is_empty() && n * 4 < spare {
                            // A quiet one: hold no buffer between packets.
                            rbuf = BytesMut::new();
                            read_size = MIN_READ;
                        }
                    }
                },
                _ = durable(&mut gate), if holding || awaiting => {
                    if let Some(g) = &mut gate {
                        if !g.release() {
                            warn!("storage failed; closing the connection");
                            // What waits acknowledges changes that will never be durable: it
                            // never goes out, and the DISCONNECT saying why goes instead.
                            let cut = g.holds.front().map(|&(offset, _)| offset);
                            if let Some(offset) = cut {
                                self.wbuf.truncate(offset.saturating_sub(g.base) as usize);
                            }
                            g.holds.clear();
                            self.needs = Ticket::NONE;
                            if cut.zip(g.connack_end).is_some_and(|(cut, end)| end > cut) {
                                // Nothing may precede CONNACK, not even DISCONNECT.
                                self.conn.connection_lost(Instant::now());
                            } else {
                                self.conn.disconnect(Instant::now(), ReasonCode::UnspecifiedError);
                            }
                        }
                        let now = Instant::now();
                        for delivery in g.durable_deliveries() {
                            self.deliver(now, delivery);
                        }
                    }
                }
                _ = wait_for_room(blocked_on.as_deref()), if blocked_on.is_some() => {
                    self.retry_blocked(Instant::now());
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    self.conn.handle_timeout(Instant::now());
                }
            }
            if self.gate.is_none() {
                self.gate = gate;
            }
        }
        // Send what is left (CONNACK refusal, DISCONNECT), briefly; what waits for storage goes
        // once it is durable.
        if !self.wbuf.is_empty() {
            let flush = async {
                if let Some(gate) = &mut self.gate {
                    while !gate.holds.is_empty() {
                        if gate.watermark.changed().await.is_err() || !gate.release() {
                            break;
                        }
                    }
                }
                let writable = self.writable();
                let _ = wr.write_all(&self.wbuf[..writable]).await;
                let _ = wr.flush().await;
            };
            let _ = Box::pin(tokio::time::timeout(
                std::time::Duration::from_secs(1),
                flush,
            ))
            .await;
        }
        let _ = wr.shutdown().await;
        self.hand_off_session();
        (!self.closed_by_client).then(|| rd.unsplit(wr))
    }

    fn flush_transmits(&mut self) {
        let Some(version) = self.conn.version() else {
            return;
        };
        let start = self.wbuf.len();
        let mut connack_end = None;
        while let Some(packet) = self.conn.poll_transmit() {
            if matches!(packet, mqttd_proto::Packet::Publish(_)) {
                self.inner.metrics.messages_sent.inc();
            }
            if let Err(e) = packet.encode(version, &mut self.wbuf) {
                warn!(error = %e, "dropping a packet that cannot be encoded");
            }
            if matches!(packet, mqttd_proto::Packet::ConnAck(_)) {
                connack_end = Some(self.wbuf.len());
            }
        }
        if self.needs.is_none() || self.wbuf.len() == start {
            return;
        }
        let gate = self
            .gate
            .get_or_insert_with(|| Gate::new(self.inner.storage.watermark()));
        if gate.watermark.borrow().covers(self.needs) {
            return;
        }
        // Everything encoded now was produced after the change: it all waits.
        if gate.holds.back().is_none_or(|&(_, t)| t < self.needs) {
            gate.holds.push_back((gate.base + start as u64, self.needs));
        }
        if let Some(end) = connack_end {
            gate.connack_end = Some(gate.base + end as u64);
        }
    }

    /// Reads and decodes what the transport already holds, without waiting for more.
    async fn read_available<R: AsyncRead + Unpin>(&mut self, rd: &mut R, rbuf: &mut BytesMut) {
        for _ in 0..16 {
            if self.conn.is_closed() {
                return;
            }
            if rbuf.capacity() - rbuf.len() < MIN_READ {
                rbuf.reserve(16 * MIN_READ);
            }
            // A zero timeout polls the read once: ready data is taken, nothing is waited for.
            match tokio::time::timeout(std::time::Duration::ZERO, rd.read_buf(rbuf)).await {
                Ok(Ok(n)) if n > 0 => {
                    self.inner.metrics.bytes_received.inc_by(n as u64);
                    self.decode(rbuf);
                }
                _ => return,
            }
        }
    }

    fn decode(&mut self, rbuf: &mut BytesMut) {
        // One clock reading per batch of packets: they arrived together.
        let now = Instant::now();
        loop {
            match self.reader.read(rbuf, self.conn.version()) {
                Ok(Some(packet)) => {
                    self.conn.handle_packet(now, packet);
                    if self.conn.is_closed() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(error) => {
                    self.inner.metrics.protocol_errors.inc();
                    debug!(%error, "malformed packet");
                    self.conn.handle_decode_error(now, &error);
                    return;
                }
            }
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
    /// output reaches its high-water mark or the session's queue is full. The loop comes back
    /// here when the client has read or acknowledged something. What was routed meanwhile
    /// follows at the same pace, and then the feed ends.
    fn feed_retained(&mut self, now: Instant) {
        let Some(mut feed) = self.retained.take() else {
            return;
        };
        while !self.conn.is_closed() {
            // Encoded now, so that the output's size says how far the client is behind.
            self.flush_transmits();
            if self.wbuf.len() >= WRITE_HIGH_WATER {
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

    fn deliver_now(&mut self, now: Instant, delivery: Delivery) {
        if delivery.qos == QoS::AtMostOnce && self.wbuf.len() >= QOS0_DROP_AT {
            self.inner.metrics.messages_dropped.inc();
            return;
        }
        // Asked of the hooks for every message, and of the ACL as loaded now (it may have
        // been reloaded since the client connected).
        if let Some(client) = &self.client {
            if !self
                .inner
                .authorize(client, Action::Receive, &delivery.message.topic)
            {
                self.discard(&delivery);
                return;
            }
        }
        let stored = delivery.store_seq.is_some().then(|| delivery.clone());
        let outcome = self.conn.deliver(now, delivery);
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

    /// Handles the machine's events; those that must wait (CONNECT, authentication, a storage
    /// sync) run boxed, so that the future every connection's task holds stays small.
    async fn process_events(&mut self) {
        while let Some(waiting) = self.process_ready_events() {
            Box::pin(self.complete(waiting)).await;
        }
    }

    async fn complete(&mut self, waiting: Waiting) {
        match waiting {
            Waiting::Connect(request) => self.on_connect(request).await,
            Waiting::AuthContinue(data) => self.on_auth_continue(data).await,
        }
    }

    /// Handles events until one needs to wait, which it returns.
    fn process_ready_events(&mut self) -> Option<Waiting> {
        while let Some(event) = self.conn.poll_event() {
            match event {
                Event::Connect(request) => return Some(Waiting::Connect(request)),
                Event::AuthContinue { data } => return Some(Waiting::AuthContinue(data)),
                Event::ReAuthenticate { data } => self.on_reauthenticate(data),
                Event::Publish(publish) => self.on_publish(publish),
                Event::Subscribe(subscribe) => self.on_subscribe(subscribe),
                Event::Unsubscribe(unsubscribe) => self.on_unsubscribe(unsubscribe),
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
                        self.depends_on(ticket);
                    }
                }
                Event::InboundReleased { .. } => {}
                Event::Closed { reason, by_client } => {
                    self.closed_by_client = by_client;
                    if let Some(client) = &self.client {
                        self.inner.metrics.clients_connected.dec();
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
        None
    }

    async fn on_connect(&mut self, request: ConnectRequest) {
        let now = Instant::now();
        let connect = &request.connect;
        if let Some(method) = &connect.properties.authentication_method {
            let data = connect
                .properties
                .authentication_data
                .clone()
                .unwrap_or_default();
            match self.start_scram(method, &data) {
                Ok((state, server_first)) => {
                    self.scram = Some(Box::new(PendingScram {
                        state,
                        connect: Some(request),
                    }));
                    let _ = self.conn.auth_continue(Some(server_first.into()));
                }
                Err(reason) => self.refuse(now, reason),
            }
            return;
        }
        let verdict = if connect.username.is_some() && self.inner.auth.load().passwords.is_some() {
            match self.authenticate_blocking(connect).await {
                Some(verdict) => verdict,
                None => return,
            }
        } else {
            self.inner.authenticate(&ConnectAttempt {
                client_id: &connect.client_id,
                username: connect.username.as_ref(),
                password: connect.password.as_ref(),
                version: connect.protocol,
                peer: &self.peer,
            })
        };
        if let Err(reason) = verdict {
            info!(%reason, username = ?connect.username, "authentication failed");
            return self.refuse(now, reason);
        }
        self.finish_connect(request, None).await;
    }

    /// Authenticates a CONNECT whose password is checked against the password file: costly
    /// work, done off the runtime's worker threads with a bounded number at once (see
    /// [`crate::auth`]). The wait for a turn ends at the CONNECT deadline or at shutdown, with
    /// a refusal; then `None`.
    async fn authenticate_blocking(
        &mut self,
        connect: &mqttd_proto::Connect,
    ) -> Option<Result<(), ReasonCode>> {
        let inner = self.inner.clone();
        let peer = self.peer.clone();
        let client_id = connect.client_id.clone();
        let username = connect.username.clone();
        let password = connect.password.clone();
        let version = connect.protocol;
        let verify = crate::auth::verify_blocking(move || {
            inner.authenticate(&ConnectAttempt {
                client_id: &client_id,
                username: username.as_ref(),
                password: password.as_ref(),
                version,
                peer: &peer,
            })
        });
        let deadline = self
            .conn
            .poll_timeout()
            .map(|t| tokio::time::Instant::now() + t.saturating_duration_since(Instant::now()));
        let reason = tokio::select! {
            verdict = verify => match verdict {
                Some(verdict) => return Some(verdict),
                None => {
                    warn!("authentication failed unexpectedly");
                    ReasonCode::UnspecifiedError
                }
            },
            _ = sleep_until(deadline) => {
                info!("no turn to check the password before the CONNECT deadline");
                ReasonCode::ServerBusy
            }
            _ = self.inner.shutdown.cancelled() => ReasonCode::ServerUnavailable,
        };
        let _ = self.conn.reject(Instant::now(), reason);
        None
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

    async fn on_auth_continue(&mut self, data: Option<bytes::Bytes>) {
        let now = Instant::now();
        let Some(pending) = self.scram.take() else {
            return self.refuse(now, ReasonCode::ProtocolError);
        };
        let user = MqttStr::try_from(pending.state.username()).ok();
        let reauthenticating = pending.connect.is_none();
        match pending.state.finish(data.as_deref().unwrap_or_default()) {
            Ok(server_final) => {
                self.scram_user = user;
                match pending.connect {
                    Some(request) => {
                        self.finish_connect(request, Some(server_final.into()))
                            .await
                    }
                    None => {
                        if let (Some(client), Some(user)) = (&mut self.client, &self.scram_user) {
                            client.username = Some(user.clone());
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

    fn on_reauthenticate(&mut self, data: Option<bytes::Bytes>) {
        let now = Instant::now();
        let method = MqttStr::from_static(MECHANISM).unwrap_or_default();
        match self.start_scram(&method, data.as_deref().unwrap_or_default()) {
            Ok((state, server_first)) => {
                self.scram = Some(Box::new(PendingScram {
                    state,
                    connect: None,
                }));
                let _ = self.conn.auth_continue(Some(server_first.into()));
            }
            Err(reason) => self.refuse(now, reason),
        }
    }

    /// Completes an authenticated CONNECT: the session, then CONNACK.
    async fn finish_connect(&mut self, request: ConnectRequest, auth_data: Option<bytes::Bytes>) {
        let now = Instant::now();
        let connect = &request.connect;
        let assigned = connect
            .client_id
            .is_empty()
            .then(|| self.inner.assign_client_id());
        let client_id = assigned
            .clone()
            .unwrap_or_else(|| connect.client_id.clone());
        tracing::Span::current().record("client_id", client_id.as_str());
        let client = ClientInfo {
            client_id,
            username: self.scram_user.clone().or_else(|| connect.username.clone()),
            version: connect.protocol,
            peer: self.peer.clone(),
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
        let acquired = self
            .inner
            .acquire_session(
                now,
                &client.client_id,
                connect.clean_start,
                request.session_expiry_interval,
                &self.mailbox,
            )
            .await;
        self.handle = Some(acquired.handle);
        if self.conn.is_closed() {
            // The client left while the session was being acquired: keep the session.
            debug!("connection closed during CONNECT");
            self.unaccepted = Some(Box::new(acquired.session));
            return;
        }
        let mut accept = Accept::new(acquired.session, acquired.present);
        accept.assigned_client_id = assigned.filter(|_| connect.protocol == ProtocolVersion::V5);
        accept.authentication_data = auth_data;
        if let Err(error) = self.conn.accept(Instant::now(), accept) {
            warn!(%error, "CONNECT could not be accepted");
            return;
        }
        info!(version = %client.version, session_present = acquired.present, keep_alive = request.keep_alive, "client connected");
        self.inner.metrics.clients_connected.inc();
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
        self.save_session();
        self.client = Some(Box::new(client));
    }

    /// Routes a message and acknowledges it; if that stored anything, the acknowledgement
    /// waits in the output until it is durable (persist, then acknowledge).
    fn on_publish(&mut self, publish: InboundPublish) {
        if let Some(b) = &mut self.blocked {
            b.later.push_back(publish);
            return;
        }
        let now = Instant::now();
        self.inner.metrics.messages_received.inc();
        let InboundPublish {
            mut message,
            packet_id,
            ..
        } = publish;
        let mut blocked = Blocked::new();
        let reason = match self.admit(&mut message) {
            Ok(()) => {
                let message = Arc::new(message);
                // One atomic write for everything this publication changes; nothing to wait
                // for after a QoS 0 one but a retained message, written on its own.
                let inner = &*self.inner;
                let mut batch = if inner.durable && message.qos != QoS::AtMostOnce {
                    inner.storage.batch()
                } else {
                    Batch::direct(&*inner.storage)
                };
                if message.retain {
                    inner.retain(&message, &mut batch);
                }
                let key = self.handle.as_ref().map(|h| h.key);
                // QoS 0 and 1 publishers wait for subscribers that are behind; QoS 2 ones do
                // not yet, because the atomic batch has to cover all copies at once.
                let routed = if message.qos == QoS::ExactlyOnce {
                    inner.route_in(now, &message, key, &mut batch)
                } else {
                    inner.route_or_block(now, &message, key, &mut blocked, &mut batch)
                };
                if message.qos == QoS::ExactlyOnce && self.persistent() {
                    if let (Some(handle), Some(packet_id)) = (&self.handle, packet_id) {
                        // The batch's ticket covers it.
                        let _ = batch.pending_release(&handle.client_id, packet_id, true);
                        let _ = update_flag(&handle.stored_messages, true);
                    }
                }
                let ticket = batch.commit();
                self.depends_on(ticket);
                if routed == 0 {
                    ReasonCode::NoMatchingSubscribers
                } else {
                    ReasonCode::Success
                }
            }
            Err(reason) => {
                self.inner.metrics.messages_dropped.inc();
                debug!(%reason, topic = %message.topic, "publish refused");
                reason
            }
        };
        if blocked.is_empty() {
            if let Some(id) = packet_id {
                let _ = self.conn.publish_ack(id, reason);
            }
        } else {
            self.blocked = Some(Box::new(BlockedPublish {
                packet_id,
                reason,
                progress: progress_of(&blocked),
                deliveries: blocked,
                since: now,
                later: VecDeque::new(),
            }));
        }
    }

    /// Whether the session outlives the connection.
    fn persistent(&self) -> bool {
        self.conn.session().is_some_and(|s| s.expiry_interval() > 0)
    }

    /// Records where a stored QoS 2 message's flow stands.
    fn flow_moved(
        &mut self,
        store_seq: u64,
        packet_id: mqttd_proto::PacketId,
        state: OutboundState,
    ) {
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
        let config = &self.inner.config;
        topic.len() <= config.max_topic_length
            && topic.split('/').count() <= config.max_topic_levels
    }

    /// Checks a published message against limits, ACL and hooks.
    fn admit(&self, message: &mut Message) -> Result<(), ReasonCode> {
        let topic = message.topic.as_str();
        if !self.topic_within_limits(topic) {
            return Err(ReasonCode::TopicNameInvalid);
        }
        let Some(client) = &self.client else {
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

    fn on_subscribe(&mut self, subscribe: Subscribe) {
        let (Some(handle), Some(client)) = (self.handle.clone(), self.client.as_ref()) else {
            return;
        };
        let config = &self.inner.config;
        let max_qos = self.inner.server_config.maximum_qos;
        let id = subscribe.properties.subscription_identifier;
        let mut reasons = Vec::with_capacity(subscribe.filters.len());
        let mut adds = Vec::new();
        for sub in &subscribe.filters {
            let filter = &sub.filter;
            let text = filter.as_str();
            let reason = if text.len() > config.max_topic_length
                || filter.pattern().split('/').count() > config.max_topic_levels
            {
                ReasonCode::TopicFilterInvalid
            } else if config.max_subscriptions > 0
                && handle.subscriptions.lock().len() + adds.len() >= config.max_subscriptions
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
        let existed = self.inner.subscribe(&adds);
        let now = Instant::now();
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
        self.save_session();
        if !retained.is_empty() {
            // Snapshots of the store, read as the client makes room.
            let feed = self.retained.get_or_insert_with(|| {
                Box::new(RetainedFeed {
                    cursors: VecDeque::new(),
                    next: None,
                    deferred: VecDeque::new(),
                })
            });
            for (filter, options, id) in retained {
                feed.cursors
                    .push_back((self.inner.retained.cursor(&filter), options, id));
            }
            self.feed_retained(now);
        }
    }

    fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe) {
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
        self.save_session();
    }

    /// Records the session in storage if it is persistent or has a will; what the client
    /// is told next waits until that is durable.
    fn save_session(&mut self) {
        if let (Some(handle), Some(session)) = (&self.handle, self.conn.session()) {
            let will = self.will.as_deref().cloned();
            let ticket = self
                .inner
                .save_session(handle, session.expiry_interval(), will, None);
            self.depends_on(ticket);
        }
    }

    /// Moves the session to where it lives next: the connection that took it over, the
    /// broker's store of offline sessions, or nowhere if it ended.
    fn hand_off_session(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        // Publishers waiting for room in this session's queue stop waiting for this
        // connection: the queue now fills offline, under the offline rules.
        handle.set_saturated(false);
        handle.set_congested(false);
        handle
            .capacity
            .store(usize::MAX, std::sync::atomic::Ordering::Relaxed);
        let now = Instant::now();
        let mut session = self
            .conn
            .take_session()
            .or_else(|| self.unaccepted.take().map(|s| *s));
        // Stored messages that waited for their changes to be durable go first, in order;
        // they enter the session's queue once it is known where the session goes next.
        let mut waiting: Vec<Delivery> = self
            .gate
            .as_mut()
            .map(|g| {
                g.awaiting_len = 0;
                std::mem::take(&mut g.awaiting)
            })
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
        if self.takeover_reply.is_none() {
            let mut slot = handle.slot.lock();
            let ours =
                matches!(&*slot, Slot::Online { mailbox } if Arc::ptr_eq(mailbox, &self.mailbox));
            if ours {
                drain(&mut waiting, &mut self.takeover_reply);
                *slot = Slot::Transferring { buffer: Vec::new() };
                drop(slot);
                match session {
                    Some(mut s) if s.expiry_interval() > 0 => {
                        self.inner
                            .enqueue_all(now, &id, Some(&mut s), waiting, Headed::Offline);
                        // DISCONNECT may have changed the expiry; the will, if any, now waits
                        // for its delay.
                        let since = SystemTime::now();
                        let will = s.pending_will().map(|(will, due)| StoredWill {
                            will: will.clone(),
                            delay: due.saturating_duration_since(now).as_secs_f64().ceil() as u32,
                        });
                        // The connection is gone: nothing it sends waits for the record.
                        let _ = self.inner.save_session(
                            &handle,
                            s.expiry_interval(),
                            will,
                            Some(since),
                        );
                        self.inner.park_session(now, &handle, s, since);
                    }
                    mut s => {
                        self.inner
                            .enqueue_all(now, &id, s.as_mut(), waiting, Headed::Online);
                        self.inner.end_session(now, &handle, s)
                    }
                }
                return;
            }
            // Another connection is taking the session over; its request is in the mailbox.
        }
        drain(&mut waiting, &mut self.takeover_reply);
        self.inner
            .enqueue_all(now, &id, session.as_mut(), waiting, Headed::Online);
        if let Some(reply) = self.takeover_reply.take() {
            let _ = reply.send(session);
        }
    }
}

fn progress_of(blocked: &Blocked) -> u64 {
    blocked
        .iter()
        .map(|(h, _)| h.progress.load(std::sync::atomic::Ordering::Relaxed))
        .fold(0, u64::wrapping_add)
}

/// Resolves when `handle`'s queue may have room: when it says so, or after a short while,
/// whichever comes first.
async fn wait_for_room(handle: Option<&SessionHandle>) {
    match handle {
        Some(h) => {
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(2), h.room.notified()).await;
        }
        None => std::future::pending().await,
    }
}

/// Resolves when the watermark moves.
async fn durable(gate: &mut Option<Box<Gate>>) {
    match gate {
        Some(g) => {
            if g.watermark.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::AccessControl;
    use crate::auth::ScramServer;
    use crate::config::{Config, OfflineQos0};
    use crate::hooks::{NoHooks, Transport};
    use mqttd_proto::{ClientId, TopicName};

    fn delivery(qos: QoS) -> Delivery {
        let topic = TopicName::try_from("t").unwrap();
        Delivery::new(Arc::new(Message::new(topic, b"x".to_vec(), qos, false)))
    }

    /// The QoS of what a persistent session's queue holds once its connection closed with
    /// a QoS 0 and a QoS 1 message still in its mailbox.
    async fn parked_after_close(offline_qos0: OfflineQos0) -> Vec<QoS> {
        let config = Config {
            offline_qos0,
            ..Config::default()
        };
        let inner = Arc::new(Inner::new(
            config,
            Arc::new(NoHooks),
            AccessControl::default(),
            ScramServer::new([0; 32]),
            Arc::new(crate::storage::MemoryStorage::default()),
        ));
        let peer = Peer {
            transport: Transport::Tcp,
            addr: ([127, 0, 0, 1], 1883).into(),
            listener: Arc::from("test"),
        };
        let mut conn = Connection::new(inner.clone(), peer);
        let now = Instant::now();
        let id = ClientId::try_from("c").unwrap();
        let acquired = inner
            .acquire_session(now, &id, true, 3600, &conn.mailbox)
            .await;
        let handle = acquired.handle.clone();
        conn.handle = Some(acquired.handle);
        conn.unaccepted = Some(Box::new(acquired.session));
        assert!(handle.deliver(now, delivery(QoS::AtMostOnce), &inner));
        assert!(handle.deliver(now, delivery(QoS::AtLeastOnce), &inner));
        conn.hand_off_session();
        let slot = handle.slot.lock();
        let Slot::Offline { session, .. } = &*slot else {
            panic!("the session is not parked: {slot:?}");
        };
        session.queued().map(|d| d.qos).collect()
    }

    #[tokio::test]
    async fn closing_parks_qos0_only_if_offline_qos0_is_queue() {
        assert_eq!(
            parked_after_close(OfflineQos0::Drop).await,
            [QoS::AtLeastOnce]
        );
        assert_eq!(
            parked_after_close(OfflineQos0::Queue).await,
            [QoS::AtMostOnce, QoS::AtLeastOnce]
        );
    }
}
