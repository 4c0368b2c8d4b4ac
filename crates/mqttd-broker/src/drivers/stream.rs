//! The driver of a connection over one byte stream (TCP and WebSocket now; TLS and
//! single-stream QUIC carry the same): it moves bytes and wake-ups between the transport and the
//! connection's [`ConnectionCore`], and answers the core's requests. Every decision is the
//! core's.
//!
//! # Select order
//!
//! Each turn, the driver first answers the core's requests (a password check, the session),
//! then lets it [`ConnectionCore::process`], and then waits for the first of, in this order:
//!
//! 1. shutdown of the broker (once);
//! 2. the mailbox: messages routed to the session, a takeover request;
//! 3. room to write output the core allows out, then bytes to read, while the core wants
//!    them and all read so far is handled (one future over the stream, which is not split);
//! 4. the rest of a read the core has not handled yet ([`TURN_INPUT`]), after a yield;
//! 5. the storage's watermark, while something waits for it;
//! 6. room in the queue a waiting publication is blocked on;
//! 7. the core's next timer.
//!
//! Earlier arms win when several are ready: what arrives for the session is handed to it
//! before more is read, and output goes out before more input adds to it.
//!
//! # What an idle connection holds
//!
//! Most connections are idle most of the time, and what each holds then is multiplied by all
//! of them: the task's future (one select over the arms above), the boxed core, and the
//! socket. No read buffer: a quiet connection reads into a buffer on the stack, copied out
//! only when bytes came ([`transfer`]). No split of the stream (an `Arc` and a lock each).
//!
//! A plain TCP connection ([`serve_tcp`]) holds no task either once it has been idle for
//! [`PARK_AFTER`]: [`run`] returns its stream, and the driver parks the core, the socket (out
//! of tokio's reactor), the span and the permit in its listener's [`ParkingLot`] and ends; the
//! lot spawns it again ([`resume`]) when something comes for it (see [`park`](super::park)).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::io::poll_read_buf;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use mqttd_proto::StreamId;

use super::park::{detach, Parked, ParkingLot, PARK_AFTER};
use super::{answer, durable, now, sleep_until, wait_for_room};
use crate::broker::Inner;
use crate::core::{ConnectionCore, ParkedCore};
use crate::hooks::Peer;
use crate::storage::Watermark;

/// Smallest read buffer, and the stack buffer a quiet connection reads into.
const MIN_READ: usize = 256;
/// Largest read buffer a busy connection grows to.
const MAX_READ: usize = 64 * 1024;
/// How long, after the broker ended a connection (DISCONNECT, a refusing CONNACK, a timeout),
/// it goes on reading and discarding what the client still sends, unless the client closes
/// its end first. Closing a socket with unread input makes the kernel reset the connection,
/// which fails the client's writes and can discard the answer it has not read yet; reading
/// until the client has seen the close lets it learn why.
const LINGER: Duration = Duration::from_secs(1);
/// The buffer input is discarded through while lingering: all a lingering connection holds.
const LINGER_BUF: usize = 2048;
/// How long a closed connection may take to send what it has left.
const LAST_WORDS: Duration = Duration::from_secs(1);

/// How many bytes of packets the core handles per turn of the driver: the rest of a larger
/// read waits for the next turn, after the task has yielded to the runtime. A read of up to
/// [`MAX_READ`] bytes can hold thousands of packets (3,200 filters in SUBSCRIBEs, say), and
/// handling them in one go would keep other connections on the worker waiting.
const TURN_INPUT: usize = 8 * 1024;

/// Everything travels on the one stream.
const STREAM: StreamId = StreamId::CONTROL;

/// Runs a connection over `stream` to completion.
// The listeners start theirs with `serve_since`; bridges, the fuzz targets and the core's
// tests here.
pub(crate) fn serve<S>(
    inner: Arc<Inner>,
    stream: S,
    peer: Peer,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    serve_since(inner, stream, peer, now())
}

/// Runs a connection over `stream`, accepted at `accepted`, to completion: the CONNECT
/// deadline counts from `accepted`, so that what came before MQTT on the connection (a PROXY
/// header, a TLS handshake, a WebSocket upgrade) took part of it.
/// The core is built and boxed before the future exists ([`super::open`]).
pub(crate) fn serve_since<S>(
    inner: Arc<Inner>,
    stream: S,
    peer: Peer,
    accepted: Instant,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    serve_holding(inner, stream, peer, accepted, ())
}

/// As [`serve_since`], holding `guard` (a connection permit) until the connection has ended.
pub(crate) fn serve_holding<S, G>(
    inner: Arc<Inner>,
    stream: S,
    peer: Peer,
    accepted: Instant,
    guard: G,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    G: Send + 'static,
{
    let (core, span) = super::open(&inner, peer, accepted);
    drive(inner, stream, core, span, guard)
}

async fn drive<S, G>(
    inner: Arc<Inner>,
    stream: S,
    mut core: Box<ConnectionCore>,
    span: tracing::Span,
    guard: G,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let rest = match run(&inner, &mut core, stream, false).instrument(span).await {
        Ended::Closed(rest) => rest,
        // Not asked to park: never idle.
        Ended::Idle(_) => None,
    };
    // Nothing of the connection but its socket stays while it lingers.
    drop(core);
    end(&inner, rest).await;
    drop(guard);
}

/// Runs a plain TCP connection, accepted at `accepted` and holding `permit`, to completion;
/// while it is idle, it waits in `lot` without a task (see [`park`](super::park)).
pub(crate) fn serve_tcp(
    inner: Arc<Inner>,
    lot: Arc<ParkingLot>,
    stream: TcpStream,
    peer: Peer,
    accepted: Instant,
    permit: Option<OwnedSemaphorePermit>,
) -> impl Future<Output = ()> + Send + 'static {
    let (core, span) = super::open(&inner, peer, accepted);
    drive_tcp(
        inner,
        lot,
        ParkedCore::Whole(core),
        Ok(stream),
        span,
        permit,
    )
}

/// Gives a parked connection its task back: its driver goes on where it parked.
pub(crate) fn resume(inner: &Arc<Inner>, lot: &Arc<ParkingLot>, parked: Parked) {
    let Parked {
        core,
        stream,
        span,
        permit,
    } = parked;
    core.mailbox().forget_waker();
    inner.tasks.spawn(drive_tcp(
        inner.clone(),
        lot.clone(),
        core,
        Err(stream),
        span,
        permit,
    ));
}

/// Drives a TCP connection until it closes or parks. Its socket is in tokio's reactor (`Ok`),
/// or out of it (`Err`), as the lot keeps it.
async fn drive_tcp(
    inner: Arc<Inner>,
    lot: Arc<ParkingLot>,
    core: ParkedCore,
    stream: Result<TcpStream, std::net::TcpStream>,
    mut span: tracing::Span,
    mut permit: Option<OwnedSemaphorePermit>,
) {
    let mut core = core.unpark(&inner);
    let mut stream = match stream {
        Ok(stream) => Some(stream),
        Err(socket) => attach(socket, &span),
    };
    let rest = loop {
        let Some(tcp) = stream.take() else {
            // The socket could not go back into the reactor: the connection is lost, and
            // closes as one whose socket failed (the will, the session).
            let closed = tokio::io::join(tokio::io::empty(), tokio::io::sink());
            let _ = run(&inner, &mut core, closed, false)
                .instrument(span.clone())
                .await;
            break None;
        };
        match run(&inner, &mut core, tcp, true)
            .instrument(span.clone())
            .await
        {
            Ended::Closed(rest) => break rest,
            Ended::Idle(idle) => {
                let socket = match detach(idle) {
                    Ok(socket) => socket,
                    // No descriptor to spare: it keeps its task.
                    Err(idle) => {
                        stream = Some(idle);
                        continue;
                    }
                };
                let parked = Parked {
                    core: core.park(),
                    stream: socket,
                    span,
                    permit,
                };
                match lot.park(parked) {
                    Ok(()) => return,
                    // It has something to do already, or the broker is shutting down.
                    Err(back) => {
                        core = back.core.unpark(&inner);
                        span = back.span;
                        permit = back.permit;
                        stream = attach(back.stream, &span);
                    }
                }
            }
        }
    };
    drop(core);
    end(&inner, rest).await;
    drop(permit);
}

/// A parked socket back in tokio's reactor; `None` if it cannot be registered (no memory, or
/// the runtime is going away).
fn attach(socket: std::net::TcpStream, span: &tracing::Span) -> Option<TcpStream> {
    match TcpStream::from_std(socket) {
        Ok(stream) => Some(stream),
        Err(error) => {
            warn!(parent: span, %error, "the socket of a parked connection could not be watched again");
            None
        }
    }
}

/// The end of every connection: lingers on `rest`, the stream of a connection the broker
/// ended, and counts the connection out.
async fn end<S: AsyncRead + Unpin>(inner: &Inner, rest: Option<S>) {
    if let Some(stream) = rest {
        // Boxed: the rare end of a connection need not widen every idle one's future.
        Box::pin(linger(stream, &inner.shutdown)).await;
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

/// How [`run`] ended.
enum Ended<S> {
    /// The connection closed: its stream, its writing side shut down, if the broker ended
    /// it, for the caller to [`linger`] on.
    Closed(Option<S>),
    /// The connection has been idle for [`PARK_AFTER`] (it was asked to park): its stream,
    /// with nothing half read; the core holds the rest.
    Idle(S),
}

/// Drives the connection until it closes or, if `park`, until it has been idle
/// ([`ConnectionCore::is_idle`], nothing half read) for [`PARK_AFTER`].
async fn run<S>(
    inner: &Arc<Inner>,
    core: &mut ConnectionCore,
    mut stream: S,
    park: bool,
) -> Ended<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let mut rbuf = BytesMut::new();
    let mut read_size = MIN_READ;
    let shutdown = inner.shutdown.clone();
    let mailbox = core.mailbox().clone();
    let mut watermark: Option<watch::Receiver<Watermark>> = None;
    let mut shutting_down = false;
    // Whether `rbuf` may hold packets the core has not handled yet (see [`TURN_INPUT`]).
    let mut unhandled = false;
    // Since when the connection has been idle, if it may park.
    let mut idle_since: Option<Instant> = None;
    loop {
        core.process(now());
        if let Some(request) = core.poll_request() {
            Box::pin(answer(inner, core, request)).await;
            continue;
        }
        if core.is_closed() {
            break;
        }
        let deadline = core.poll_timeout();
        let reading = core.wants_read(STREAM);
        let waits_for_storage = core.waits_for_storage();
        if waits_for_storage && watermark.is_none() {
            let mut rx = inner.storage.watermark();
            // Looked at once even if it never moves again: storage may have failed.
            rx.mark_changed();
            watermark = Some(rx);
        }
        let blocked_on = core.blocked_on();
        // A quiet connection (nothing half read, small reads) holds no buffer while it
        // waits: `transfer` reads into one on the stack.
        let quiet = rbuf.is_empty() && read_size == MIN_READ;
        if !unhandled && !quiet && rbuf.capacity() - rbuf.len() < MIN_READ {
            rbuf.reserve(read_size);
        }
        let spare = if quiet {
            MIN_READ
        } else {
            rbuf.capacity() - rbuf.len()
        };
        let writable = core.output(STREAM).map_or(&[][..], |o| o.writable());
        if park && quiet && !unhandled && !shutting_down && core.is_idle() {
            if idle_since.is_none() {
                idle_since = Some(now());
            }
        } else {
            idle_since = None;
        }
        let timer = match (deadline, idle_since.map(|t| t + PARK_AFTER)) {
            (Some(d), Some(p)) => Some(d.min(p)),
            (d, p) => d.or(p),
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                core.shutdown(now());
            }
            _ = mailbox.wait() => {
                let inbox = mailbox.take();
                if inbox.takeover.is_some() && reading {
                    // What the client sent before the new connection came counts first: a
                    // DISCONNECT already here cancels the will and may end the session.
                    Box::pin(read_available(core, &mut stream, &mut rbuf)).await;
                }
                core.handle_inbox(now(), inbox);
            }
            io = transfer(&mut stream, writable, &mut rbuf, reading && !unhandled),
                if (reading && !unhandled) || !writable.is_empty() => match io {
                Io::Wrote(Ok(0) | Err(_)) | Io::Read(Ok(0) | Err(_)) => {
                    core.connection_lost(now());
                }
                Io::Wrote(Ok(n)) => {
                    core.wrote(STREAM, n);
                    if core.output(STREAM).is_none_or(|o| o.buf.is_empty())
                        && stream.flush().await.is_err()
                    {
                        core.connection_lost(now());
                    }
                }
                Io::Read(Ok(n)) => {
                    core.received(n);
                    unhandled = core.handle_input_within(now(), STREAM, &mut rbuf, TURN_INPUT);
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
            _ = yield_turn(), if reading && unhandled => {
                unhandled = core.handle_input_within(now(), STREAM, &mut rbuf, TURN_INPUT);
            }
            w = durable(&mut watermark), if waits_for_storage => core.handle_watermark(now(), w),
            _ = wait_for_room(blocked_on.as_deref()), if blocked_on.is_some() => {
                core.retry_blocked(now());
            }
            _ = sleep_until(timer), if timer.is_some() => {
                let now = now();
                if idle_since.is_some_and(|t| now >= t + PARK_AFTER) {
                    return Ended::Idle(stream);
                }
                core.handle_timeout(now);
                // Not activity: the idle time goes on.
                continue;
            }
        }
        // Anything else that woke the connection was activity.
        idle_since = None;
    }
    // Send what is left (CONNACK refusal, DISCONNECT), briefly; what waits for storage goes
    // once it is durable.
    if core.output(STREAM).is_some_and(|o| !o.buf.is_empty()) {
        let last_words = async {
            super::release_held(inner, core, STREAM, &mut watermark).await;
            let writable = core.output(STREAM).map_or(&[][..], |o| o.writable());
            let _ = stream.write_all(writable).await;
            let _ = stream.flush().await;
        };
        if tokio::time::timeout(LAST_WORDS, Box::pin(last_words))
            .await
            .is_err()
        {
            info!("the client did not take the connection's last output in time");
        }
    }
    let _ = stream.shutdown().await;
    let by_client = core.finish(now(), std::time::SystemTime::now());
    Ended::Closed((!by_client).then_some(stream))
}

/// What one turn of [`transfer`] did.
enum Io {
    Wrote(std::io::Result<usize>),
    Read(std::io::Result<usize>),
}

/// Writes `writable` or, failing that, reads into `rbuf` if `read`, whichever the stream is
/// ready for first: one future over the whole stream, so that it needs no split. Into an
/// empty `rbuf` without room, it reads through a buffer on the stack, so that a connection
/// waiting for input holds none.
fn transfer<'a, S: AsyncRead + AsyncWrite + Unpin>(
    stream: &'a mut S,
    writable: &'a [u8],
    rbuf: &'a mut BytesMut,
    read: bool,
) -> impl Future<Output = Io> + 'a {
    std::future::poll_fn(move |cx| {
        if !writable.is_empty() {
            if let Poll::Ready(res) = Pin::new(&mut *stream).poll_write(cx, writable) {
                return Poll::Ready(Io::Wrote(res));
            }
        }
        if !read {
            return Poll::Pending;
        }
        if rbuf.capacity() > rbuf.len() {
            return poll_read_buf(Pin::new(&mut *stream), cx, &mut *rbuf).map(Io::Read);
        }
        let mut buf = [0; MIN_READ];
        let mut on_stack = ReadBuf::new(&mut buf);
        Pin::new(&mut *stream)
            .poll_read(cx, &mut on_stack)
            .map(|res| {
                Io::Read(res.map(|()| {
                    rbuf.extend_from_slice(on_stack.filled());
                    on_stack.filled().len()
                }))
            })
    })
}

/// Reads and handles what the transport already holds, without waiting for more.
async fn read_available<R: AsyncRead + Unpin>(
    core: &mut ConnectionCore,
    rd: &mut R,
    rbuf: &mut BytesMut,
) {
    for _ in 0..16 {
        if core.is_closed() {
            return;
        }
        if rbuf.capacity() - rbuf.len() < MIN_READ {
            rbuf.reserve(16 * MIN_READ);
        }
        // A zero timeout polls the read once: ready data is taken, nothing is waited for.
        match tokio::time::timeout(Duration::ZERO, rd.read_buf(rbuf)).await {
            Ok(Ok(n)) if n > 0 => {
                core.received(n);
                core.handle_input(now(), STREAM, rbuf);
            }
            _ => return,
        }
    }
}

/// Lets the runtime run other tasks before this one goes on: the task wakes itself and is
/// queued again behind them.
///
/// Unlike [`tokio::task::yield_now`], which puts the wake-up aside until the worker next
/// looks for work, waking at once tells an idle worker that there is work: it wakes, and
/// while this task keeps its worker busy it is the idle one that waits on the sockets, so
/// another connection's bytes are handled as they arrive rather than when this worker next
/// polls for I/O, which on a loaded machine the OS may make wait for many milliseconds.
async fn yield_turn() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await;
}
