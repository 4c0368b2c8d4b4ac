//! noq's connection and streams behind the `h3` crate's QUIC traits (`h3::quic`).
//!
//! The `h3` crate speaks HTTP/3 over any QUIC stack that implements its poll-based traits;
//! hyperium's `h3-quinn` does it for quinn, and nothing does it for noq, n0's quinn fork that the
//! broker runs on. The two APIs are close, with one shape difference: noq's accept and open
//! calls return futures that borrow the connection, while `h3` polls them through `&mut self`.
//! Each pending call is therefore a boxed future that owns a clone of the connection handle
//! (one `Arc`), and is dropped when it completes. Reads copy into a small buffer through noq's
//! `poll_read`, and writes go through `poll_write`: this adapter serves health checks and
//! metrics, where a copy costs nothing worth a second future per stream.
//!
//! Stream ids are converted once, when the stream is accepted or opened, so that a conversion
//! failure is an error there and the id getters that the traits make infallible cannot panic.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h3::error::Code;
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};
use noq::VarInt;

/// How many bytes one `poll_data` reads at most: a request's HEADERS frame fits.
const READ_SIZE: usize = 4096;

/// An accept or open call in flight, owning its connection handle.
type Pending<T> = Option<Pin<Box<dyn Future<Output = T> + Send>>>;

/// Polls the call in `slot`, starting it with `start` if none is in flight; the slot is empty
/// again once the call completes, so that the next poll starts the next call.
fn poll_pending<T>(
    slot: &mut Pending<T>,
    cx: &mut Context<'_>,
    start: impl FnOnce() -> Pin<Box<dyn Future<Output = T> + Send>>,
) -> Poll<T> {
    let call = slot.get_or_insert_with(start);
    let output = ready!(call.as_mut().poll(cx));
    *slot = None;
    Poll::Ready(output)
}

/// An application error code as a QUIC varint: `h3` only passes HTTP/3 codes, which all fit;
/// anything else becomes `H3_INTERNAL_ERROR` rather than a panic.
fn error_code(code: u64) -> VarInt {
    VarInt::from_u64(code).unwrap_or(VarInt::from_u32(0x102))
}

/// The `h3` stream id of a noq stream.
fn stream_id(id: noq::StreamId) -> Result<StreamId, InvalidId> {
    StreamId::try_from(u64::from(id)).map_err(|_| InvalidId(id))
}

/// A noq stream id that `h3` did not accept (both are QUIC varints, so this does not happen).
#[derive(Debug)]
struct InvalidId(noq::StreamId);

impl fmt::Display for InvalidId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stream id {} is not an HTTP/3 stream id", self.0)
    }
}

impl std::error::Error for InvalidId {}

impl From<InvalidId> for ConnectionErrorIncoming {
    fn from(e: InvalidId) -> Self {
        Self::InternalError(e.to_string())
    }
}

impl From<InvalidId> for StreamErrorIncoming {
    fn from(e: InvalidId) -> Self {
        Self::ConnectionErrorIncoming {
            connection_error: e.into(),
        }
    }
}

/// Why the connection ended, in `h3`'s terms: the peer's application code, the idle timeout,
/// or a QUIC-level reason that HTTP/3 has no name for.
fn connection_error(e: noq::ConnectionError) -> ConnectionErrorIncoming {
    match e {
        noq::ConnectionError::ApplicationClosed(close) => {
            ConnectionErrorIncoming::ApplicationClose {
                error_code: close.error_code.into_inner(),
            }
        }
        noq::ConnectionError::TimedOut => ConnectionErrorIncoming::Timeout,
        other => ConnectionErrorIncoming::Undefined(Arc::new(other)),
    }
}

fn lost(e: noq::ConnectionError) -> StreamErrorIncoming {
    StreamErrorIncoming::ConnectionErrorIncoming {
        connection_error: connection_error(e),
    }
}

fn read_error(e: noq::ReadError) -> StreamErrorIncoming {
    match e {
        noq::ReadError::Reset(code) => StreamErrorIncoming::StreamTerminated {
            error_code: code.into_inner(),
        },
        noq::ReadError::ConnectionLost(e) => lost(e),
        other => StreamErrorIncoming::Unknown(Box::new(other)),
    }
}

fn write_error(e: noq::WriteError) -> StreamErrorIncoming {
    match e {
        noq::WriteError::Stopped(code) => StreamErrorIncoming::StreamTerminated {
            error_code: code.into_inner(),
        },
        noq::WriteError::ConnectionLost(e) => lost(e),
        other => StreamErrorIncoming::Unknown(Box::new(other)),
    }
}

/// A noq connection as an `h3` QUIC connection: accepts the peer's streams and opens ours.
pub(crate) struct Connection {
    conn: noq::Connection,
    accept_bi: Pending<Result<(noq::SendStream, noq::RecvStream), noq::ConnectionError>>,
    accept_uni: Pending<Result<noq::RecvStream, noq::ConnectionError>>,
    opener: Opener,
}

impl Connection {
    /// Wraps `conn`; it stays usable by its other handles.
    pub(crate) fn new(conn: noq::Connection) -> Self {
        Self {
            opener: Opener::new(conn.clone()),
            conn,
            accept_bi: None,
            accept_uni: None,
        }
    }
}

impl<B: Buf> quic::Connection<B> for Connection {
    type RecvStream = RecvStream;
    type OpenStreams = Opener;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::RecvStream, ConnectionErrorIncoming>> {
        let conn = &self.conn;
        let recv = ready!(poll_pending(&mut self.accept_uni, cx, || {
            let conn = conn.clone();
            Box::pin(async move { conn.accept_uni().await })
        }))
        .map_err(connection_error)?;
        Poll::Ready(Ok(RecvStream::new(recv)?))
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        let conn = &self.conn;
        let (send, recv) = ready!(poll_pending(&mut self.accept_bi, cx, || {
            let conn = conn.clone();
            Box::pin(async move { conn.accept_bi().await })
        }))
        .map_err(connection_error)?;
        Poll::Ready(Ok(BidiStream::new(send, recv)?))
    }

    fn opener(&self) -> Self::OpenStreams {
        Opener::new(self.conn.clone())
    }
}

impl<B: Buf> quic::OpenStreams<B> for Connection {
    type BidiStream = BidiStream<B>;
    type SendStream = SendStream<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_bidi(&mut self.opener, cx)
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_send(&mut self.opener, cx)
    }

    fn close(&mut self, code: Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.opener, code, reason);
    }
}

/// Opens streams on a noq connection: the server's control and QPACK streams, a client's
/// requests.
pub(crate) struct Opener {
    conn: noq::Connection,
    open_bi: Pending<Result<(noq::SendStream, noq::RecvStream), noq::ConnectionError>>,
    open_uni: Pending<Result<noq::SendStream, noq::ConnectionError>>,
}

impl Opener {
    fn new(conn: noq::Connection) -> Self {
        Self {
            conn,
            open_bi: None,
            open_uni: None,
        }
    }
}

impl Clone for Opener {
    /// Another opener on the same connection, with no call in flight.
    fn clone(&self) -> Self {
        Self::new(self.conn.clone())
    }
}

impl<B: Buf> quic::OpenStreams<B> for Opener {
    type BidiStream = BidiStream<B>;
    type SendStream = SendStream<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        let conn = &self.conn;
        let (send, recv) = ready!(poll_pending(&mut self.open_bi, cx, || {
            let conn = conn.clone();
            Box::pin(async move { conn.open_bi().await })
        }))
        .map_err(lost)?;
        Poll::Ready(Ok(BidiStream::new(send, recv)?))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        let conn = &self.conn;
        let send = ready!(poll_pending(&mut self.open_uni, cx, || {
            let conn = conn.clone();
            Box::pin(async move { conn.open_uni().await })
        }))
        .map_err(lost)?;
        Poll::Ready(Ok(SendStream::new(send)?))
    }

    fn close(&mut self, code: Code, reason: &[u8]) {
        self.conn.close(error_code(code.value()), reason);
    }
}

/// The receiving half of a noq stream.
pub(crate) struct RecvStream {
    stream: noq::RecvStream,
    id: StreamId,
    /// Read into, then split off as the chunk handed to `h3`; its capacity is reused once `h3`
    /// drops that chunk.
    buf: BytesMut,
}

impl RecvStream {
    fn new(stream: noq::RecvStream) -> Result<Self, InvalidId> {
        Ok(Self {
            id: stream_id(stream.id())?,
            stream,
            buf: BytesMut::new(),
        })
    }
}

impl quic::RecvStream for RecvStream {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Self::Buf>, StreamErrorIncoming>> {
        self.buf.resize(READ_SIZE, 0);
        let read = ready!(self.stream.poll_read(cx, &mut self.buf)).map_err(read_error)?;
        if read == 0 {
            // A read into a non-empty buffer returns nothing only at the end of the stream.
            self.buf.clear();
            return Poll::Ready(Ok(None));
        }
        self.buf.truncate(read);
        Poll::Ready(Ok(Some(self.buf.split().freeze())))
    }

    fn stop_sending(&mut self, code: u64) {
        // Fails only if the stream is already stopped or fully read: nothing left to stop.
        let _ = self.stream.stop(error_code(code));
    }

    fn recv_id(&self) -> StreamId {
        self.id
    }
}

/// `H3_REQUEST_CANCELLED`: what a stream dropped before its end is reset with.
const REQUEST_CANCELLED: VarInt = VarInt::from_u32(0x10c);

/// The sending half of a noq stream.
///
/// Dropped before `h3` finished or reset it (a request abandoned at its deadline), it is reset
/// with `H3_REQUEST_CANCELLED`: noq, like quinn, would otherwise finish it, and a cut-off
/// response would look complete.
pub(crate) struct SendStream<B: Buf> {
    stream: noq::SendStream,
    id: StreamId,
    /// What `h3` gave to `send_data` and `poll_ready` has not yet written.
    unsent: Option<WriteBuf<B>>,
    /// Finished or reset: nothing to do on drop.
    ended: bool,
}

impl<B: Buf> Drop for SendStream<B> {
    fn drop(&mut self) {
        if !self.ended {
            // Fails only if the stream is already finished or reset.
            let _ = self.stream.reset(REQUEST_CANCELLED);
        }
    }
}

impl<B: Buf> SendStream<B> {
    fn new(stream: noq::SendStream) -> Result<Self, InvalidId> {
        Ok(Self {
            id: stream_id(stream.id())?,
            stream,
            unsent: None,
            ended: false,
        })
    }
}

impl<B: Buf> quic::SendStream<B> for SendStream<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        while let Some(unsent) = self.unsent.as_mut() {
            if !unsent.has_remaining() {
                self.unsent = None;
                break;
            }
            let written = ready!(Pin::new(&mut self.stream).poll_write(cx, unsent.chunk()))
                .map_err(write_error)?;
            unsent.advance(written);
        }
        Poll::Ready(Ok(()))
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        if self.unsent.is_some() {
            // h3 waits for poll_ready between writes; if it did not, say so rather than
            // drop or reorder data.
            return Err(StreamErrorIncoming::ConnectionErrorIncoming {
                connection_error: ConnectionErrorIncoming::InternalError(
                    "send_data before the previous data was written".to_owned(),
                ),
            });
        }
        self.unsent = Some(data.into());
        Ok(())
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        // The stream ends after what h3 has handed over, not before it.
        ready!(self.poll_ready(cx))?;
        self.ended = true;
        Poll::Ready(
            self.stream
                .finish()
                .map_err(|e| StreamErrorIncoming::Unknown(Box::new(e))),
        )
    }

    fn reset(&mut self, code: u64) {
        self.unsent = None;
        self.ended = true;
        // Fails only if the stream is already finished or reset.
        let _ = self.stream.reset(error_code(code));
    }

    fn send_id(&self) -> StreamId {
        self.id
    }
}

/// Both halves of a bidirectional noq stream.
pub(crate) struct BidiStream<B: Buf> {
    send: SendStream<B>,
    recv: RecvStream,
}

impl<B: Buf> BidiStream<B> {
    fn new(send: noq::SendStream, recv: noq::RecvStream) -> Result<Self, InvalidId> {
        Ok(Self {
            send: SendStream::new(send)?,
            recv: RecvStream::new(recv)?,
        })
    }
}

impl<B: Buf> quic::BidiStream<B> for BidiStream<B> {
    type SendStream = SendStream<B>;
    type RecvStream = RecvStream;

    fn split(self) -> (Self::SendStream, Self::RecvStream) {
        (self.send, self.recv)
    }
}

impl<B: Buf> quic::RecvStream for BidiStream<B> {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Self::Buf>, StreamErrorIncoming>> {
        self.recv.poll_data(cx)
    }

    fn stop_sending(&mut self, code: u64) {
        self.recv.stop_sending(code);
    }

    fn recv_id(&self) -> StreamId {
        self.recv.recv_id()
    }
}

impl<B: Buf> quic::SendStream<B> for BidiStream<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(cx)
    }

    fn reset(&mut self, code: u64) {
        self.send.reset(code);
    }

    fn send_id(&self) -> StreamId {
        self.send.send_id()
    }
}
