//! The driver of an MQTT-over-QUIC connection, single- or multi-stream as EMQX has it: one
//! task per connection, around the same [`ConnectionCore`] as every other transport. It moves
//! bytes between the core and the connection's streams, and every decision is the core's.
//!
//! The connection comes from either QUIC endpoint of the broker, both noq underneath: the
//! `quic://` listener's ([`noq::Connection`]) or the `p2p://` listener's node (an iroh
//! connection, from `listener::p2p`), whose streams are the same noq streams. [`QuicConn`] is
//! what the driver needs of either.
//!
//! # Streams
//!
//! The client's first bidirectional stream, QUIC stream id 0, is the control stream
//! ([`StreamId::CONTROL`]): CONNECT, CONNACK, PINGREQ, DISCONNECT and AUTH travel on it. Every
//! further bidirectional stream is a data stream, numbered by its QUIC stream id: the core
//! answers a packet on the stream it came on and delivers a subscription's messages on the
//! stream SUBSCRIBE came on. A client that opens one stream only is in single-stream mode; it
//! needs nothing else. Each stream has its own read buffer (none while idle) and is read only
//! while the core [`wants_read`](ConnectionCore::wants_read) it: data streams not before
//! CONNACK (what the client sent on them waits in QUIC's flow control until then), and a stream
//! whose output or publication is backed up not until it moves. The streams' outputs are
//! written independently, so a data stream the client does not read (flow control exhausted)
//! never delays another stream, the control stream's PINGRESP least of all; the control stream
//! also has a higher QUIC send priority.
//!
//! What the data streams hold read but not yet decoded (parts of packets) is bounded per
//! connection by a [`ReadBudget`] of one `max_packet_size`, not per stream: past it, only the
//! data streams holding the most are read until they finish their packets, and what the client
//! sends on the others waits in QUIC's flow control. The control stream is always read.
//!
//! A data stream the client finishes, resets or stops is lost ([`ConnectionCore::stream_lost`]:
//! what was owed on it moves to the control stream); a malformed packet on a data stream makes
//! the core reset that stream alone ([`ConnectionCore::poll_reset`]): STOP_SENDING and
//! RESET_STREAM, while the connection and its other streams go on. Losing the control stream,
//! or the connection, loses the connection. Clients may open no unidirectional streams.
//!
//! # Select order
//!
//! Each turn, the driver answers the core's requests, lets it
//! [`process`](ConnectionCore::process), resets the streams it asks to, and then waits for the
//! first of, in this order (as [`super::stream`] does):
//!
//! 1. shutdown of the broker (once);
//! 2. the mailbox: messages routed to the session, a takeover request;
//! 3. room to write on any stream with output the core allows out: the control stream first,
//!    then the data streams in turn, so that one with much to send cannot starve the others;
//! 4. bytes (or the end) on any stream the core wants read (a data stream only within the
//!    read budget), taken in turn across streams;
//! 5. a new stream from the client (or the end of the connection);
//! 6. the storage's watermark, while something waits for it;
//! 7. room in the queue a waiting publication is blocked on;
//! 8. the core's next timer, or the next look at the connection's QUIC statistics
//!    ([`stats`]), whichever comes first.
//!
//! # Error codes
//!
//! A stream reset and the connection close carry the MQTT reason code byte as their QUIC
//! application error code: `0x00` normal (the client's DISCONNECT, or its close), `0x81`
//! malformed packet, `0x82` protocol error, `0x87` not authorized, `0xA0` the handshake or
//! the CONNECT did not come within `connect_timeout`, `0x8B` server shutting down, `0x8D`
//! keep alive timeout, `0x8E` session taken over, and so on: the reason of the DISCONNECT or
//! refusing CONNACK the broker sent on the control stream just before, which it finishes and
//! lets the client acknowledge first (for at most [`LAST_WORDS`]), so that the client learns
//! why even if it misses the close.

use std::cmp::Reverse;
use std::future::poll_fn;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use noq::{
    Connection, ConnectionError, ConnectionStats, Path, PathStats, RecvStream, SendStream, VarInt,
};
use prometheus_client::metrics::gauge::Gauge;
use smallvec::SmallVec;
use tokio::sync::watch;
use tracing::{debug, info, Instrument};

use mqttd_proto::{ReasonCode, StreamId};

use super::{answer, durable, now, sleep_until, wait_for_room};
use crate::broker::Inner;
use crate::config::Config;
use crate::core::ConnectionCore;
use crate::hooks::Peer;
use crate::metrics::Metrics;
use crate::storage::Watermark;
use stats::QuicStats;

mod stats;

/// What the driver needs of a QUIC connection: the client's streams, the close, and the
/// statistics it reports. Implemented by noq's own connection (`quic://`) and by the
/// peer-to-peer node's (`p2p://`).
pub(crate) trait QuicConn: Send + Sync + 'static {
    /// Waits for the client's next bidirectional stream.
    fn accept_bi(
        &self,
    ) -> impl Future<Output = Result<(SendStream, RecvStream), ConnectionError>> + Send + '_;

    /// Closes the connection with an application error `code`.
    fn close(&self, code: VarInt, reason: &[u8]);

    /// Why the connection closed; `None` while it is open.
    fn close_reason(&self) -> Option<ConnectionError>;

    /// The connection's statistics over all its paths.
    fn stats(&self) -> ConnectionStats;

    /// A path to hold, so that its statistics stay readable after it closes (noq's path 0);
    /// `None` where paths come and go (a node's connection: relayed, then direct).
    fn first_path(&self) -> Option<Path>;

    /// The statistics of the path carrying data now (`held`, if there is one), and the
    /// client's address on it if the path goes straight to the client.
    fn path_sample(&self, held: Option<&Path>) -> (Option<PathStats>, Option<SocketAddr>);

    /// The gauge of such connections open now.
    fn open_gauge(metrics: &Metrics) -> &Gauge;

    /// What the admin API reads of the connection's path when asked.
    fn probe(&self) -> crate::broker::PathProbe;
}

/// The admin API's view of a path's statistics.
pub(crate) fn path_view(
    stats: &PathStats,
    remote: Option<SocketAddr>,
    relay: Option<String>,
) -> crate::broker::QuicPathView {
    crate::broker::QuicPathView {
        rtt: stats.rtt,
        cwnd: stats.cwnd,
        congestion_events: stats.congestion_events,
        sent_packets: stats.sent_packets,
        lost_packets: stats.lost_packets,
        received_datagrams: stats.udp_rx.datagrams,
        remote,
        relay,
    }
}

impl QuicConn for Connection {
    fn accept_bi(
        &self,
    ) -> impl Future<Output = Result<(SendStream, RecvStream), ConnectionError>> + Send + '_ {
        Self::accept_bi(self)
    }

    fn close(&self, code: VarInt, reason: &[u8]) {
        Self::close(self, code, reason);
    }

    fn close_reason(&self) -> Option<ConnectionError> {
        Self::close_reason(self)
    }

    fn stats(&self) -> ConnectionStats {
        Self::stats(self)
    }

    fn first_path(&self) -> Option<Path> {
        self.path(noq::PathId::ZERO)
    }

    fn path_sample(&self, held: Option<&Path>) -> (Option<PathStats>, Option<SocketAddr>) {
        // The broker negotiates no multipath: path 0 moves with the client.
        let id = held.map_or(noq::PathId::ZERO, Path::id);
        (
            self.path_stats(id),
            held.and_then(|p| p.remote_address().ok()),
        )
    }

    fn open_gauge(metrics: &Metrics) -> &Gauge {
        &metrics.quic_connections
    }

    fn probe(&self) -> crate::broker::PathProbe {
        let weak = self.weak_handle();
        crate::broker::PathProbe(Box::new(move || {
            let conn = weak.upgrade()?;
            // The broker negotiates no multipath: path 0 moves with the client.
            let stats = conn.path_stats(noq::PathId::ZERO)?;
            let remote = conn
                .path(noq::PathId::ZERO)
                .and_then(|p| p.remote_address().ok());
            Some(path_view(&stats, remote, None))
        }))
    }
}

/// Smallest read buffer: what an idle stream holds while it waits (see `stream.rs`).
const MIN_READ: usize = 256;
/// Largest read buffer a busy stream grows to.
const MAX_READ: usize = 64 * 1024;
/// How long a closed connection may take to send what it has left on the control stream and
/// have the client acknowledge it, before the connection is closed anyway.
pub(crate) const LAST_WORDS: Duration = Duration::from_secs(1);
/// The control stream's QUIC send priority; data streams have 0.
const CONTROL_PRIORITY: i32 = 1;

/// One client stream and what the driver holds for it.
struct Stream {
    id: StreamId,
    send: SendStream,
    recv: RecvStream,
    /// Read, not yet decoded: a partial packet. Empty and unallocated while idle.
    rbuf: BytesMut,
    read_size: usize,
}

impl Stream {
    fn new(id: StreamId, send: SendStream, recv: RecvStream) -> Self {
        Self {
            id,
            send,
            recv,
            rbuf: BytesMut::new(),
            read_size: MIN_READ,
        }
    }

    /// Grows or drops the read buffer after a read of `n` bytes into `spare` free bytes.
    fn after_read(&mut self, n: usize, spare: usize) {
        if n == spare {
            // A busy stream: read more at a time.
            self.read_size = (self.read_size * 2).min(MAX_READ);
        } else if self.rbuf.is_empty() && n * 4 < spare {
            // A quiet one: hold no buffer between packets.
            self.rbuf = BytesMut::new();
            self.read_size = MIN_READ;
        }
    }

    /// Writes what the core allows out on this stream, if it has any and there is room.
    fn poll_write(&mut self, cx: &mut Context<'_>, core: &ConnectionCore) -> Poll<Io> {
        let writable = core.output(self.id).map_or(&[][..], |o| o.writable());
        if writable.is_empty() {
            return Poll::Pending;
        }
        Pin::new(&mut self.send)
            .poll_write(cx, writable)
            .map(|res| Io::Wrote(self.id, res))
    }

    /// Resets both directions with `code` (STOP_SENDING, RESET_STREAM).
    fn reset(&mut self, code: VarInt) {
        // Fails only if the direction is already closed, which is what is wanted.
        let _ = self.send.reset(code);
        let _ = self.recv.stop(code);
    }
}

/// What happened on the streams.
enum Io {
    /// The stream took `n` bytes of its writable output, or failed.
    Wrote(StreamId, Result<usize, noq::WriteError>),
    /// On the stream at this index of [`Streams::list`] (valid until the streams change), `n`
    /// bytes arrived (0: the client finished the stream), from `spare` free bytes; or the
    /// stream failed (reset by the client, or the connection is gone).
    Read(usize, std::io::Result<usize>, usize),
}

/// How much the data streams of a connection may hold read but not yet decoded (the parts of
/// packets still arriving) before most of them stop being read: one `max_packet_size`, the
/// most a byte-stream connection holds, instead of that much per stream.
///
/// Past the limit, only the data streams holding the most are read (the earlier opened first
/// among equals), so they finish their packets and the total falls again. The others are not
/// all stopped: what the client sent on a stream that is not read stays in QUIC's receive
/// buffers, up to a stream receive window, and counts against the connection's receive window;
/// the client needs room in that to send the rest of the packets being read, and PINGREQ on
/// the control stream. noq grants more of it once an eighth of the window was read, so at
/// most as many streams wait as leave that much room ([`Self::max_waiting`]).
#[derive(Debug, Clone, Copy)]
struct ReadBudget {
    /// Bytes the data streams may hold, together, before some wait.
    limit: usize,
    /// How many data streams may be waiting at once, for whatever reason (the core may hold
    /// some back itself).
    max_waiting: usize,
}

impl ReadBudget {
    /// The budget under `config`'s `max_packet_size` and QUIC receive windows.
    fn new(config: &Config) -> Self {
        Self::with(
            config.max_packet_size,
            config.quic.conn_flow_control_window,
            config.quic.stream_recv_window_default,
        )
    }

    fn with(max_packet_size: u32, conn_window: u32, stream_window: u32) -> Self {
        let room = u64::from(conn_window) - u64::from(conn_window) / 8;
        let max_waiting = room
            .checked_div(u64::from(stream_window))
            .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
        Self {
            limit: usize::try_from(max_packet_size).unwrap_or(usize::MAX),
            max_waiting,
        }
    }
}

/// A data stream's rank for reading past the read budget: bytes held, then the earlier opened.
type Rank = (usize, Reverse<usize>);

/// The streams of a connection: the control stream first, once the client opened it.
struct Streams {
    list: Vec<Stream>,
    /// Where the next look for input starts, so that a busy stream cannot starve the others.
    next_read: usize,
    /// Where the next look for room among the data streams starts, likewise for output.
    next_write: usize,
    budget: ReadBudget,
}

impl Streams {
    fn new(budget: ReadBudget) -> Self {
        Self {
            list: Vec::new(),
            next_read: 0,
            next_write: 0,
            budget,
        }
    }

    /// Adds a stream the client opened; the control stream goes first.
    fn add(&mut self, stream: Stream) {
        if stream.id.is_control() {
            self.list.insert(0, stream);
        } else {
            self.list.push(stream);
        }
    }

    fn get_mut(&mut self, id: StreamId) -> Option<&mut Stream> {
        self.list.iter_mut().find(|s| s.id == id)
    }

    /// Forgets `id`; dropping its halves finishes what is still open of it.
    fn remove(&mut self, id: StreamId) -> Option<Stream> {
        let at = self.list.iter().position(|s| s.id == id)?;
        Some(self.list.remove(at))
    }

    /// Bytes the data streams hold read but not yet decoded.
    fn held(&self) -> usize {
        self.list
            .iter()
            .filter(|s| !s.id.is_control())
            .map(|s| s.rbuf.len())
            .sum()
    }

    /// While the data streams hold the budget's limit or more: the lowest [`Rank`] a data stream
    /// the core wants read must have to be read now (at least one is). `None`: all are read.
    fn read_cutoff(&self, core: &ConnectionCore) -> Option<Rank> {
        if self.held() < self.budget.limit {
            return None;
        }
        let mut data = 0;
        let mut wanted: SmallVec<[Rank; 16]> = SmallVec::new();
        for (at, s) in self.list.iter().enumerate() {
            if s.id.is_control() {
                continue;
            }
            data += 1;
            if core.wants_read(s.id) {
                wanted.push((s.rbuf.len(), Reverse(at)));
            }
        }
        let held_back = data - wanted.len();
        let waiting = self
            .budget
            .max_waiting
            .saturating_sub(held_back)
            .min(wanted.len().saturating_sub(1));
        if waiting == 0 {
            return None;
        }
        let read = wanted.len() - waiting;
        // `read` is at least 1 and at most `wanted.len()`.
        let (_, &mut cutoff, _) = wanted.select_nth_unstable_by(read - 1, |a, b| b.cmp(a));
        Some(cutoff)
    }

    /// Writes what the core allows out, the control stream first and then the data streams
    /// from the one after the last written; else reads from the streams the core wants read
    /// (data streams within the read budget), from the one after the last read; the first
    /// that is ready.
    fn poll_io(&mut self, cx: &mut Context<'_>, core: &ConnectionCore) -> Poll<Io> {
        if let Some(s) = self.list.first_mut().filter(|s| s.id.is_control()) {
            if let Poll::Ready(io) = s.poll_write(cx, core) {
                return Poll::Ready(io);
            }
        }
        let len = self.list.len();
        for i in 0..len {
            let at = (self.next_write + i) % len;
            let Some(s) = self.list.get_mut(at).filter(|s| !s.id.is_control()) else {
                continue;
            };
            if let Poll::Ready(io) = s.poll_write(cx, core) {
                self.next_write = at + 1;
                return Poll::Ready(io);
            }
        }
        let cutoff = self.read_cutoff(core);
        for i in 0..len {
            let at = (self.next_read + i) % len;
            let Some(s) = self.list.get_mut(at) else {
                continue;
            };
            if !core.wants_read(s.id) {
                continue;
            }
            if cutoff.is_some_and(|c| !s.id.is_control() && (s.rbuf.len(), Reverse(at)) < c) {
                continue;
            }
            if s.rbuf.capacity() - s.rbuf.len() < MIN_READ {
                s.rbuf.reserve(s.read_size);
            }
            let spare = s.rbuf.capacity() - s.rbuf.len();
            if let Poll::Ready(res) =
                tokio_util::io::poll_read_buf(Pin::new(&mut s.recv), cx, &mut s.rbuf)
            {
                self.next_read = at + 1;
                return Poll::Ready(Io::Read(at, res, spare));
            }
        }
        Poll::Pending
    }
}

/// Runs an MQTT connection over the QUIC connection `conn`, accepted at `accepted` (the CONNECT
/// deadline counts from then, so the handshake took part of it), to completion. The core is
/// built before the future and boxed, as `stream::serve_since` does.
pub(crate) fn serve<C: QuicConn>(
    inner: Arc<Inner>,
    conn: C,
    peer: Peer,
    accepted: Instant,
) -> impl Future<Output = ()> + Send + 'static {
    let addr = peer.addr;
    let (core, span) = super::open(&inner, peer, accepted);
    C::open_gauge(&inner.metrics).inc();
    drive(inner, conn, core, span, addr)
}

async fn drive<C: QuicConn>(
    inner: Arc<Inner>,
    conn: C,
    mut core: Box<ConnectionCore>,
    span: tracing::Span,
    addr: SocketAddr,
) {
    let interval = Duration::from_secs(inner.config.quic.stats_interval);
    let mut stats = QuicStats::new(&conn, addr, interval, now());
    let _ = core.mailbox().path.set(conn.probe());
    run(&inner, &mut core, &conn, &mut stats)
        .instrument(span.clone())
        .await;
    drop(core);
    span.in_scope(|| stats.finish(&conn, &inner.metrics));
    C::open_gauge(&inner.metrics).dec();
    inner.metrics.connections_open.dec();
}

/// Drives the connection until the core closes it, then sends the last words and closes the
/// QUIC connection with the reason code. Looks at the connection's QUIC statistics on the way.
async fn run(
    inner: &Arc<Inner>,
    core: &mut ConnectionCore,
    conn: &impl QuicConn,
    stats: &mut QuicStats,
) {
    let mut streams = Streams::new(ReadBudget::new(&inner.config));
    let shutdown = inner.shutdown.clone();
    let mailbox = core.mailbox().clone();
    let mut watermark: Option<watch::Receiver<Watermark>> = None;
    let mut shutting_down = false;
    loop {
        let turn = now();
        core.process(turn);
        // Checked every turn, not only when the timer below fires: a busy connection's
        // streams may win every select.
        stats.look_if_due(turn, conn, &inner.metrics);
        if let Some(request) = core.poll_request() {
            Box::pin(answer(inner, core, request)).await;
            continue;
        }
        while let Some((id, reason)) = core.poll_reset() {
            if let Some(mut stream) = streams.remove(id) {
                stream.reset(VarInt::from(reason.as_u8()));
                inner.metrics.quic_stream_resets.inc();
            }
        }
        if core.is_closed() {
            break;
        }
        let deadline = core.poll_timeout();
        let wake = match (deadline, stats.next_look()) {
            (Some(d), Some(l)) => Some(d.min(l)),
            (d, l) => d.or(l),
        };
        let waits_for_storage = core.waits_for_storage();
        if waits_for_storage && watermark.is_none() {
            let mut rx = inner.storage.watermark();
            // Looked at once even if it never moves again: storage may have failed.
            rx.mark_changed();
            watermark = Some(rx);
        }
        let blocked_on = core.blocked_on();
        let core_now = &*core;
        let io = poll_fn(|cx| streams.poll_io(cx, core_now));
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                core.shutdown(now());
            }
            _ = mailbox.wait() => {
                let inbox = mailbox.take();
                if inbox.takeover.is_some() {
                    // What the client sent before the new connection came counts first: a
                    // DISCONNECT already here cancels the will and may end the session.
                    read_available(core, &mut streams);
                }
                core.handle_inbox(now(), inbox);
            }
            io = io => handle_io(core, &mut streams, conn, io),
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    // QUIC stream id 0, the client's first bidirectional stream, is
                    // `StreamId::CONTROL`.
                    let id = StreamId::new(u64::from(send.id()));
                    if id.is_control() {
                        // Errors only if the stream is already closed; then reading tells.
                        let _ = send.set_priority(CONTROL_PRIORITY);
                    }
                    debug!(stream = %id, "stream opened");
                    streams.add(Stream::new(id, send, recv));
                }
                Err(error) => {
                    debug!(%error, "connection lost");
                    core.connection_lost(now());
                }
            },
            w = durable(&mut watermark), if waits_for_storage => core.handle_watermark(now(), w),
            _ = wait_for_room(blocked_on.as_deref()), if blocked_on.is_some() => {
                core.retry_blocked(now());
            }
            _ = sleep_until(wake), if wake.is_some() => {
                let t = now();
                if deadline.is_some_and(|d| d <= t) {
                    core.handle_timeout(t);
                }
            }
        }
    }
    last_words(inner, core, &mut streams, &mut watermark).await;
    let reason = core.close_reason().unwrap_or(ReasonCode::Success);
    let by_client = core.finish(now(), std::time::SystemTime::now());
    let code = if by_client { 0 } else { reason.as_u8() };
    conn.close(VarInt::from(code), reason.to_string().as_bytes());
}

/// Hands what happened on a stream to the core.
fn handle_io(core: &mut ConnectionCore, streams: &mut Streams, conn: &impl QuicConn, io: Io) {
    match io {
        Io::Wrote(id, Ok(n)) => core.wrote(id, n),
        Io::Wrote(id, Err(error)) => {
            debug!(stream = %id, %error, "stream write failed");
            lose(core, streams, conn, id);
        }
        Io::Read(at, read, spare) => {
            let Some(s) = streams.list.get_mut(at) else {
                return;
            };
            let id = s.id;
            match read {
                // There was room to read into (`poll_io` makes some): the end of the stream.
                Ok(0) => {
                    debug!(stream = %id, "stream finished by the client");
                    lose(core, streams, conn, id);
                }
                Ok(n) => {
                    core.received(n);
                    core.handle_input(now(), id, &mut s.rbuf);
                    s.after_read(n, spare);
                }
                Err(error) => {
                    debug!(stream = %id, %error, "stream read failed");
                    lose(core, streams, conn, id);
                }
            }
        }
    }
}

/// Stream `id` ended: a data stream is lost while the connection lives on; the control stream,
/// or any stream once the connection is gone, loses the connection.
fn lose(core: &mut ConnectionCore, streams: &mut Streams, conn: &impl QuicConn, id: StreamId) {
    if id.is_control() || conn.close_reason().is_some() {
        core.connection_lost(now());
    } else {
        streams.remove(id);
        core.stream_lost(now(), id);
    }
}

/// Reads and handles what the control stream already holds, without waiting for more.
fn read_available(core: &mut ConnectionCore, streams: &mut Streams) {
    let Some(control) = streams.get_mut(StreamId::CONTROL) else {
        return;
    };
    let mut cx = Context::from_waker(std::task::Waker::noop());
    for _ in 0..16 {
        if !core.wants_read(StreamId::CONTROL) {
            return;
        }
        if control.rbuf.capacity() - control.rbuf.len() < MIN_READ {
            control.rbuf.reserve(16 * MIN_READ);
        }
        let read =
            tokio_util::io::poll_read_buf(Pin::new(&mut control.recv), &mut cx, &mut control.rbuf);
        match read {
            Poll::Ready(Ok(n)) if n > 0 => {
                core.received(n);
                core.handle_input(now(), StreamId::CONTROL, &mut control.rbuf);
            }
            _ => return,
        }
    }
}

/// Sends what is left on the control stream (a refusing CONNACK, DISCONNECT), once what it
/// waits for is durable, finishes the stream and waits until the client has it; all within
/// [`LAST_WORDS`].
async fn last_words(
    inner: &Inner,
    core: &mut ConnectionCore,
    streams: &mut Streams,
    watermark: &mut Option<watch::Receiver<Watermark>>,
) {
    let Some(control) = streams.get_mut(StreamId::CONTROL) else {
        return;
    };
    let words = async {
        super::release_held(inner, core, StreamId::CONTROL, watermark).await;
        let writable = core
            .output(StreamId::CONTROL)
            .map_or(&[][..], |o| o.writable());
        if control.send.write_all(writable).await.is_err() {
            return;
        }
        if control.send.finish().is_ok() {
            // Resolves once the client acknowledged all of it (or stopped the stream).
            let _ = control.send.stopped().await;
        }
    };
    if tokio::time::timeout(LAST_WORDS, Box::pin(words))
        .await
        .is_err()
    {
        info!("the client did not take the connection's last output in time");
    }
}

#[cfg(test)]
mod tests;
