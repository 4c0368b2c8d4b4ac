//! The server side of a TLS connection over a byte stream, on rustls' unbuffered API
//! ([`UnbufferedServerConnection`]) with buffers this module owns, so that a connection with
//! nothing to read or write holds none.
//!
//! rustls' buffered `ServerConnection` (what tokio-rustls wraps) keeps a read buffer of at
//! least 4 KiB for the connection's whole life, and tokio-rustls keeps that connection inline
//! in its stream, which every future holding the stream then carries. Here the stream is the
//! socket and one pointer: rustls' state is boxed, and the three buffers (ciphertext received
//! but not processed yet, ciphertext not sent yet, plaintext not read yet) are empty, without
//! an allocation, between bursts of traffic.
//!
//! rustls does all of TLS: records, keys, key updates, alerts, close_notify. [`Tls`] only moves
//! bytes between rustls and the three buffers; [`TlsStream`] moves them between the buffers
//! and the socket.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    AppDataRecord, ConnectionState, EncodeError, EncryptError, UnbufferedStatus,
};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

/// The room made for each read from the socket, at least: what tokio-rustls reads at a time.
const MIN_READ: usize = 4 * 1024;
/// The room made for each read from the socket when the reader has that much room: one
/// record of the largest size, with its header, padding and tag.
const MAX_READ: usize = 16 * 1024 + 2 * 1024 + 5;
/// How much received ciphertext may wait for the rest of its record: a handshake message of
/// the largest size rustls accepts, in records, and one more record.
const MAX_INCOMING: usize = 0xffff + 2 * MAX_READ;
/// Spare room a partial record's buffer may keep while the connection waits.
const SHRINK_SLACK: usize = 256;
/// How much plaintext one write encrypts at most.
const MAX_WRITE: usize = 64 * 1024;
/// Up to how many bytes a vectored write gathers from small slices into one record.
const GATHER: usize = 2 * 1024;

/// A TLS connection, server side, over the byte stream `S`: [`AsyncRead`] and [`AsyncWrite`]
/// of the plaintext once [`TlsStream::accept`] has run the handshake.
pub(crate) struct TlsStream<S> {
    io: S,
    tls: Box<Tls>,
}

impl<S> std::fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// Runs the server side of the handshake over `io` with `config`. What a pending
    /// handshake holds is rustls' state and the part of the client's flight received so far.
    pub(crate) async fn accept(config: Arc<ServerConfig>, io: S) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut stream = Self {
            io,
            tls: Box::new(Tls::new(conn)),
        };
        std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }

    /// The rustls connection, for what the handshake established (the client's certificates).
    pub(crate) fn connection(&self) -> &UnbufferedServerConnection {
        &self.tls.conn
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let stop = self.process(cx, None, Want::Nothing)?;
            // The server's flight goes out before more of the client's is awaited.
            ready!(self.poll_send(cx))?;
            match stop {
                // Done only once the client's flight is verified too (rustls may allow writing
                // before, with half-RTT data, which the broker does not enable).
                Stop::Traffic(_) if !self.tls.conn.is_handshaking() => return Poll::Ready(Ok(())),
                Stop::Traffic(_) => {}
                Stop::Closed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed TLS during the handshake",
                    )))
                }
                Stop::Handshaking => {}
            }
            if ready!(self.poll_fill(cx, MIN_READ))? == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed the connection during the TLS handshake",
                )));
            }
        }
    }

    /// Lets rustls process what was received (see [`Tls::process`]); on a TLS error, sends the
    /// alert rustls has for the peer, without waiting for it to go, and fails.
    fn process(
        &mut self,
        cx: &mut Context<'_>,
        out: Option<&mut ReadBuf<'_>>,
        want: Want<'_>,
    ) -> io::Result<Stop> {
        if let Some(error) = &self.tls.failed {
            return Err(tls_error((**error).clone()));
        }
        match self.tls.process(out, want) {
            Ok(stop) => Ok(stop),
            Err(Failure::Tls(error)) => {
                self.tls.encode_alert();
                let _ = self.poll_send(cx);
                self.tls.failed = Some(Box::new(error.clone()));
                Err(tls_error(error))
            }
            Err(Failure::Io(error)) => Err(error),
        }
    }

    /// Sends the ciphertext waiting in `outgoing`; once it is all sent, releases the buffer.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let outgoing = &mut self.tls.outgoing;
        while !outgoing.is_empty() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, outgoing))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => outgoing.advance(n),
            }
        }
        *outgoing = BytesMut::new();
        Poll::Ready(Ok(()))
    }

    /// Reads ciphertext from the socket into `incoming`, with room for `size` bytes at least:
    /// how many bytes came (0 at the end of the stream). While nothing comes, `incoming` holds
    /// only what waits for the rest of its record, in a buffer of that size.
    fn poll_fill(&mut self, cx: &mut Context<'_>, size: usize) -> Poll<io::Result<usize>> {
        let incoming = &mut self.tls.incoming;
        if incoming.len() >= MAX_INCOMING {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a TLS message larger than the broker accepts",
            )));
        }
        incoming.reserve(size);
        let polled = poll_read_buf(Pin::new(&mut self.io), cx, incoming);
        if polled.is_pending() {
            if incoming.is_empty() {
                *incoming = BytesMut::new();
            } else if incoming.capacity() > 2 * incoming.len() + SHRINK_SLACK {
                // Shrunk only while mostly empty: a record trickled in a byte at a time is
                // then copied at most once per read of `size`, not once per byte.
                *incoming = BytesMut::from(&incoming[..]);
            }
        }
        polled
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            let plaintext = &mut this.tls.plaintext;
            if !plaintext.is_empty() {
                let n = plaintext.len().min(buf.remaining());
                buf.put_slice(&plaintext[..n]);
                plaintext.advance(n);
                if plaintext.is_empty() {
                    *plaintext = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.tls.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if this.tls.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without sending TLS close_notify",
                )));
            }
            let before = buf.filled().len();
            this.process(cx, Some(&mut *buf), Want::Nothing)?;
            if !this.tls.outgoing.is_empty() {
                // What reading produced (an alert, a handshake message) goes out now if the
                // socket takes it, else with the next write.
                if let Poll::Ready(Err(error)) = this.poll_send(cx) {
                    return Poll::Ready(Err(error));
                }
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            if !this.tls.plaintext.is_empty() || this.tls.peer_closed {
                continue;
            }
            let size = buf.remaining().clamp(MIN_READ, MAX_READ);
            if ready!(this.poll_fill(cx, size))? == 0 {
                this.tls.eof = true;
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // What an earlier write encrypted goes first: one write's worth waits at most.
        ready!(this.poll_send(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.tls.closing {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS close_notify was sent",
            )));
        }
        let data = buf.get(..MAX_WRITE).unwrap_or(buf);
        let written = match this.process(cx, None, Want::Encrypt(data))? {
            Stop::Traffic(n) => n,
            Stop::Closed | Stop::Handshaking => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the TLS connection is closed",
                )))
            }
        };
        // The bytes are taken: they go now if the socket takes them, else on the next write
        // or flush.
        if let Poll::Ready(Err(error)) = this.poll_send(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(written))
    }

    /// rustls encrypts one slice at a time: small slices (a WebSocket frame header and the
    /// start of its payload) are gathered on the stack into one record.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut slices = bufs.iter().filter(|b| !b.is_empty());
        let Some(first) = slices.next() else {
            return Poll::Ready(Ok(0));
        };
        if first.len() >= GATHER {
            return self.poll_write(cx, first);
        }
        let mut gathered = [0u8; GATHER];
        let mut len = 0;
        for slice in std::iter::once(first).chain(slices) {
            let n = slice.len().min(GATHER - len);
            gathered[len..len + n].copy_from_slice(&slice[..n]);
            len += n;
            if len == GATHER {
                break;
            }
        }
        self.poll_write(cx, &gathered[..len])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.tls.closing && this.tls.failed.is_none() {
            this.tls.closing = true;
            // A connection already closed both ways has no close_notify left to send.
            this.process(cx, None, Want::CloseNotify)?;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// rustls' connection and the buffers around it: no I/O here.
struct Tls {
    conn: UnbufferedServerConnection,
    /// Ciphertext received that rustls has not consumed yet: the start of a record, or of a
    /// handshake message in several records.
    incoming: BytesMut,
    /// Ciphertext to send.
    outgoing: BytesMut,
    /// Plaintext decrypted that the reader has not taken yet.
    plaintext: BytesMut,
    /// The peer sent close_notify: reading ends after `plaintext`.
    peer_closed: bool,
    /// The socket's reading side ended.
    eof: bool,
    /// close_notify is queued: nothing more is written.
    closing: bool,
    /// rustls failed the connection with this; every later call fails with it. Boxed: it is
    /// rare, and its room would count for every connection.
    failed: Option<Box<rustls::Error>>,
}

/// What [`Tls::process`] does once the handshake is done.
#[derive(Debug, Clone, Copy)]
enum Want<'a> {
    /// Nothing: only processes what was received.
    Nothing,
    /// Encrypts these bytes into `outgoing`.
    Encrypt(&'a [u8]),
    /// Queues close_notify.
    CloseNotify,
}

/// Where [`Tls::process`] stopped.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// The handshake waits for more from the client.
    Handshaking,
    /// The handshake is done; this many bytes of [`Want::Encrypt`]'s were encrypted.
    Traffic(usize),
    /// Both sides sent close_notify.
    Closed,
}

/// Why [`Tls::process`] failed.
#[derive(Debug)]
enum Failure {
    /// rustls refused the connection (a bad record, a handshake failure).
    Tls(rustls::Error),
    /// Something else: encrypting more than rustls allows under one key.
    Io(io::Error),
}

impl Tls {
    fn new(conn: UnbufferedServerConnection) -> Self {
        Self {
            conn,
            incoming: BytesMut::new(),
            outgoing: BytesMut::new(),
            plaintext: BytesMut::new(),
            peer_closed: false,
            eof: false,
            closing: false,
            failed: None,
        }
    }

    /// Lets rustls take the complete records in `incoming`, until it waits for more or can
    /// send: decrypted data goes to `out` while it has room (and `plaintext` is empty), then
    /// to `plaintext`; what rustls has to send goes to `outgoing`, followed by what `want`
    /// asks for once the handshake is done.
    fn process(
        &mut self,
        mut out: Option<&mut ReadBuf<'_>>,
        want: Want<'_>,
    ) -> Result<Stop, Failure> {
        let Self {
            conn,
            incoming,
            outgoing,
            plaintext,
            peer_closed,
            ..
        } = self;
        let mut used = 0;
        let stopped = loop {
            let UnbufferedStatus { mut discard, state } =
                conn.process_tls_records(incoming.get_mut(used..).unwrap_or_default());
            let step = match state {
                Err(error) => Err(Failure::Tls(error)),
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    let mut read = Ok(None);
                    while let Some(record) = records.next_record() {
                        match record {
                            Ok(AppDataRecord {
                                discard: more,
                                payload,
                            }) => {
                                discard += more;
                                deliver(payload, out.as_deref_mut(), plaintext);
                            }
                            Err(error) => {
                                read = Err(Failure::Tls(error));
                                break;
                            }
                        }
                    }
                    read
                }
                Ok(ConnectionState::EncodeTlsData(mut record)) => {
                    append(outgoing, 0, |room| record.encode(room), encode_needs)
                        .map(|_| None)
                        .map_err(|e| Failure::Io(io::Error::other(e)))
                }
                // What was encoded waits in `outgoing`, which goes out before any wait for
                // input.
                Ok(ConnectionState::TransmitTlsData(sent)) => {
                    sent.done();
                    Ok(None)
                }
                Ok(ConnectionState::BlockedHandshake) => Ok(Some(Stop::Handshaking)),
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    let written = match want {
                        Want::Nothing => Ok(0),
                        // rustls encrypts all of `data` or fails.
                        Want::Encrypt(data) => append(
                            outgoing,
                            encrypted_len(data.len()),
                            |room| traffic.encrypt(data, room),
                            encrypt_needs,
                        )
                        .map(|_| data.len()),
                        Want::CloseNotify => append(
                            outgoing,
                            encrypted_len(0),
                            |room| traffic.queue_close_notify(room),
                            encrypt_needs,
                        )
                        .map(|_| 0),
                    };
                    written
                        .map(|n| Some(Stop::Traffic(n)))
                        .map_err(|e| Failure::Io(io::Error::other(e)))
                }
                Ok(ConnectionState::PeerClosed) => {
                    *peer_closed = true;
                    Ok(None)
                }
                Ok(ConnectionState::Closed) => Ok(Some(Stop::Closed)),
                // Early data is not enabled: the broker's configuration never accepts it.
                Ok(_) => Err(Failure::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unexpected TLS early data",
                ))),
            };
            used += discard;
            match step {
                Ok(None) => {}
                Ok(Some(stop)) => break Ok(stop),
                Err(failure) => break Err(failure),
            }
        };
        // rustls discards only bytes it was given; `min` keeps a release build from panicking
        // if it ever did not.
        debug_assert!(
            used <= incoming.len(),
            "rustls discarded more than it was given"
        );
        incoming.advance(used.min(incoming.len()));
        stopped
    }
}

impl Tls {
    /// Encodes the alert rustls queued when it failed the connection: rustls hands out what
    /// it queued before it looks at the input again, and it is not asked a second time, when
    /// it would find the same fault and queue a second alert.
    fn encode_alert(&mut self) {
        if let Ok(ConnectionState::EncodeTlsData(mut record)) =
            self.conn.process_tls_records(&mut self.incoming[..]).state
        {
            let _ = append(
                &mut self.outgoing,
                0,
                |room| record.encode(room),
                encode_needs,
            );
        }
    }
}

/// Hands decrypted `payload` to `out` as far as it has room and nothing is waiting before it
/// in `plaintext`; keeps the rest in `plaintext`.
fn deliver(payload: &[u8], out: Option<&mut ReadBuf<'_>>, plaintext: &mut BytesMut) {
    let rest = match out {
        Some(out) if plaintext.is_empty() => {
            let (now, rest) = payload.split_at(payload.len().min(out.remaining()));
            out.put_slice(now);
            rest
        }
        _ => payload,
    };
    plaintext.extend_from_slice(rest);
}

/// Lets `write` put its bytes at the end of `out`, in `guess` bytes of room or, if it says it
/// needs more (`needs`), in as much as it needs; `out` keeps only what was written.
fn append<E>(
    out: &mut BytesMut,
    guess: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
    needs: impl Fn(&E) -> Option<usize>,
) -> Result<usize, E> {
    let start = out.len();
    out.resize(start + guess, 0);
    let mut result = write(out.get_mut(start..).unwrap_or_default());
    if let Some(size) = result.as_ref().err().and_then(&needs) {
        out.resize(start + size, 0);
        result = write(out.get_mut(start..).unwrap_or_default());
    }
    out.truncate(start + result.as_ref().map_or(0, |n| *n));
    result
}

fn encode_needs(error: &EncodeError) -> Option<usize> {
    match error {
        EncodeError::InsufficientSize(size) => Some(size.required_size),
        EncodeError::AlreadyEncoded => None,
    }
}

fn encrypt_needs(error: &EncryptError) -> Option<usize> {
    match error {
        EncryptError::InsufficientSize(size) => Some(size.required_size),
        _ => None,
    }
}

/// Room for `len` bytes of plaintext once encrypted: each record of up to 16 KiB adds a
/// header, a content type, an explicit nonce (TLS 1.2) and a tag. rustls says so if it needs
/// more (a key update message queued before the data).
fn encrypted_len(len: usize) -> usize {
    len + (len / (16 * 1024) + 1) * 64
}

fn tls_error(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    type Client = tokio_rustls::client::TlsStream<DuplexStream>;

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A server configuration with a self-signed certificate for `localhost`, and a client
    /// configuration trusting it, speaking `versions`.
    fn configs(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = CertificateDer::from(certified.cert.der().to_vec());
        let key = PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A handshake over a pipe of `capacity` bytes: the server's stream and the client's.
    async fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
        capacity: usize,
    ) -> (TlsStream<DuplexStream>, Client) {
        let (server_config, client_config) = configs(versions);
        let (server_end, client_end) = tokio::io::duplex(capacity);
        let client = tokio::spawn(async move {
            tokio_rustls::TlsConnector::from(client_config)
                .connect(ServerName::try_from("localhost").unwrap(), client_end)
                .await
                .unwrap()
        });
        let server = TlsStream::accept(server_config, server_end).await.unwrap();
        (server, client.await.unwrap())
    }

    /// Polls a read once: `None` if it would wait.
    async fn poll_read_once<S: AsyncRead + Unpin>(stream: &mut S) -> Option<io::Result<usize>> {
        let mut byte = [0u8; 1];
        std::future::poll_fn(|cx| {
            let mut buf = ReadBuf::new(&mut byte);
            Poll::Ready(match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
                Poll::Ready(result) => Some(result.map(|()| buf.filled().len())),
                Poll::Pending => None,
            })
        })
        .await
    }

    fn assert_holds_nothing<S>(stream: &TlsStream<S>) {
        let tls = &stream.tls;
        assert_eq!(
            (
                tls.incoming.capacity(),
                tls.outgoing.capacity(),
                tls.plaintext.capacity()
            ),
            (0, 0, 0),
            "buffers of a quiet connection"
        );
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn the_stream_is_the_socket_and_one_pointer() {
        assert_eq!(
            size_of::<TlsStream<tokio::net::TcpStream>>(),
            size_of::<tokio::net::TcpStream>() + size_of::<usize>()
        );
    }

    #[tokio::test]
    async fn data_crosses_both_ways_through_a_narrow_pipe_in_tls_1_3_and_1_2() {
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
        ] {
            // A pipe narrower than a record: reads and writes stop mid-record.
            let (mut server, mut client) = pair(versions, 1000).await;
            let up = pattern(200_000, 1);
            let down = pattern(150_000, 2);
            let sent = up.clone();
            let client = tokio::spawn(async move {
                client.write_all(&sent).await.unwrap();
                client.flush().await.unwrap();
                let mut received = vec![0; 150_000];
                client.read_exact(&mut received).await.unwrap();
                (client, received)
            });
            let mut received = vec![0; up.len()];
            server.read_exact(&mut received).await.unwrap();
            assert!(received == up, "client to server");
            server.write_all(&down).await.unwrap();
            server.flush().await.unwrap();
            let (_client, received) = client.await.unwrap();
            assert!(received == down, "server to client");
            assert_eq!(poll_read_once(&mut server).await.map(|r| r.unwrap()), None);
            assert_holds_nothing(&server);
        }
    }

    #[tokio::test]
    async fn a_quiet_connection_holds_no_buffers() {
        let (mut server, mut client) = pair(&[&rustls::version::TLS13], 64 * 1024).await;
        // Before anything was read: what came after the handshake (the client's tickets
        // acknowledgement, nothing else) leaves nothing behind once the read would wait.
        assert!(poll_read_once(&mut server).await.is_none());
        assert_holds_nothing(&server);
        client.write_all(b"ping").await.unwrap();
        client.flush().await.unwrap();
        let mut ping = [0u8; 4];
        server.read_exact(&mut ping).await.unwrap();
        server.write_all(b"pong").await.unwrap();
        server.flush().await.unwrap();
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!((&ping, &pong), (b"ping", b"pong"));
        assert!(poll_read_once(&mut server).await.is_none());
        assert_holds_nothing(&server);
    }

    #[tokio::test]
    async fn key_updates_from_the_client_are_answered() {
        let (mut server, mut client) = pair(&[&rustls::version::TLS13], 64 * 1024).await;
        for round in 0..3u8 {
            // The client asks for new keys both ways; the server answers before its data.
            client.get_mut().1.refresh_traffic_keys().unwrap();
            client.write_all(&[round; 100]).await.unwrap();
            client.flush().await.unwrap();
            let mut up = [0u8; 100];
            server.read_exact(&mut up).await.unwrap();
            assert_eq!(up, [round; 100]);
            server.write_all(&[round + 10; 100]).await.unwrap();
            server.flush().await.unwrap();
            let mut down = [0u8; 100];
            client.read_exact(&mut down).await.unwrap();
            assert_eq!(down, [round + 10; 100]);
        }
    }

    #[tokio::test]
    async fn close_notify_ends_the_stream_both_ways() {
        let (mut server, mut client) = pair(&[&rustls::version::TLS13], 64 * 1024).await;
        client.write_all(b"last words").await.unwrap();
        client.shutdown().await.unwrap();
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"last words");
        // Half-closed: the server may still write, then closes its side.
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"reply");
        assert!(server.write_all(b"more").await.is_err());
    }

    #[tokio::test]
    async fn a_connection_cut_without_close_notify_is_an_error() {
        let (mut server, client) = pair(&[&rustls::version::TLS13], 64 * 1024).await;
        drop(client);
        let mut received = Vec::new();
        let error = server.read_to_end(&mut received).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn what_is_not_tls_fails_the_handshake_with_an_alert() {
        let (server_config, _) = configs(&[&rustls::version::TLS13]);
        let (server_end, mut client_end) = tokio::io::duplex(64 * 1024);
        // An MQTT CONNECT where a ClientHello should be.
        client_end
            .write_all(b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00")
            .await
            .unwrap();
        let error = TlsStream::accept(server_config, server_end)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let mut alert = Vec::new();
        client_end.read_to_end(&mut alert).await.unwrap();
        // A plaintext fatal alert record.
        assert_eq!(alert.first(), Some(&21), "{alert:?}");
    }

    #[tokio::test]
    async fn a_vectored_write_gathers_small_slices() {
        let (mut server, mut client) = pair(&[&rustls::version::TLS13], 64 * 1024).await;
        let slices = [IoSlice::new(b"head"), IoSlice::new(b"er and payload")];
        let n = std::future::poll_fn(|cx| Pin::new(&mut server).poll_write_vectored(cx, &slices))
            .await
            .unwrap();
        // Both slices at once: a WebSocket frame's header does not travel in a record alone.
        assert_eq!(n, 18);
        server.flush().await.unwrap();
        let mut received = [0u8; 18];
        client.read_exact(&mut received).await.unwrap();
        assert_eq!(&received, b"header and payload");
    }
}
