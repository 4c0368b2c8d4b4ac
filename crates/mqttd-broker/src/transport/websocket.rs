//! MQTT over WebSocket (RFC 6455), server side: the HTTP upgrade ([`accept_websocket`]), and
//! [`WsStream`], which presents the client's binary frames as one byte stream, so that the
//! byte-stream driver runs on it unchanged.
//!
//! MQTT does not align its packets with WebSocket frames: a packet may span frames and a frame
//! may hold several packets. So the stream does not gather messages at all. It reads into the
//! driver's own buffer, strips the frame headers, unmasks the payload in place and hands on
//! whatever payload bytes arrived: a frame of any size costs no memory of its own, and an idle
//! connection holds the decoder's few hundred bytes and nothing else. `max_packet_size` applies
//! to the MQTT stream as on TCP, where the driver and the codec enforce it. Control frames
//! (at most 125 bytes) are gathered in a fixed array; a ping is answered with a pong, a close
//! with a close, and the broker closing a connection sends a close frame (1000) before the
//! TCP FIN. A text frame, or anything else the RFC forbids, fails the read and sends a close
//! frame with the RFC's code (1003 for text, 1002 for protocol errors).
//!
//! Each write of the driver goes out as one binary frame (of at most [`MAX_OUT_FRAME`] bytes),
//! its header and payload in one vectored write, without copying. Pongs and closes go between
//! frames.

use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use base64::Engine as _;
use bytes::BufMut;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tracing::debug;

use super::prefixed::Prefixed;
use crate::config::Listener;

/// The subprotocols MQTT clients offer: `mqtt` (MQTT 3.1.1 and 5), and `mqttv3.1` (3.1).
pub(crate) const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];
/// The path served when the listener names none.
pub(crate) const DEFAULT_PATH: &str = "/mqtt";
/// The largest upgrade request read. Browsers send well under this (cookies included); a
/// client sending more is refused with 431.
const MAX_REQUEST: usize = 8 * 1024;
/// What the request buffer starts at; it grows only as bytes come.
const INITIAL_REQUEST: usize = 1024;
/// Headers parsed in an upgrade request.
const MAX_HEADERS: usize = 64;
/// The GUID RFC 6455 appends to the client's key.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest binary frame sent: a larger write goes out as several frames, so that a pong
/// waits for at most this much.
pub(crate) const MAX_OUT_FRAME: usize = 64 * 1024;
/// Largest control frame payload (RFC 6455, 5.5).
const MAX_CONTROL: usize = 125;
/// Longest frame header: 2 bytes, an 8-byte length, a 4-byte mask.
const MAX_HEADER: usize = 14;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Close codes (RFC 6455, 7.4.1).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_PROTOCOL_ERROR: u16 = 1002;
const CLOSE_UNSUPPORTED_DATA: u16 = 1003;

// ---- The upgrade ------------------------------------------------------------------------

/// What the upgrade agreed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Upgraded {
    /// The subprotocol chosen among the client's offers; `None` if it offered none.
    pub(crate) subprotocol: Option<&'static str>,
    /// The client's address from `Forwarded` (RFC 7239) or `X-Forwarded-For`, when the
    /// listener trusts its proxy and a header names a valid address (see [`client_address`]).
    pub(crate) forwarded_for: Option<IpAddr>,
}

/// Why an upgrade failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum HandshakeError {
    /// The connection ended before the request did.
    #[error("connection closed during the WebSocket upgrade")]
    Closed,
    /// Reading or writing failed.
    #[error("WebSocket upgrade: {0}")]
    Io(#[from] io::Error),
    /// The request was refused with an HTTP error.
    #[error("WebSocket upgrade refused: {0}")]
    Refused(#[from] Refusal),
}

/// Why an upgrade request was refused, each with its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum Refusal {
    /// Not an HTTP/1.1 request (400).
    #[error("malformed HTTP request")]
    Malformed,
    /// A method other than GET (405).
    #[error("method {0} instead of GET")]
    Method(String),
    /// A path other than the listener's (404).
    #[error("no MQTT endpoint at {0}")]
    NotFound(String),
    /// A plain HTTP request, without `Upgrade: websocket` (426).
    #[error("not a WebSocket upgrade")]
    NotUpgrade,
    /// A WebSocket version other than 13 (426).
    #[error("unsupported WebSocket version")]
    Version,
    /// A missing or malformed `Sec-WebSocket-Key` (400).
    #[error("missing or malformed Sec-WebSocket-Key")]
    Key,
    /// Subprotocols offered, none of them MQTT (400).
    #[error("no MQTT subprotocol among those offered ({0})")]
    Subprotocol(String),
    /// A request longer than [`MAX_REQUEST`] or with too many headers (431).
    #[error("request header too large")]
    TooLarge,
}

impl Refusal {
    /// The HTTP response that tells the client.
    fn response(&self) -> &'static str {
        match self {
            Self::Malformed | Self::Key | Self::Subprotocol(_) => {
                "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            }
            Self::Method(_) => {
                "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            }
            Self::NotFound(_) => {
                "HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            }
            Self::NotUpgrade | Self::Version => {
                "HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            }
            Self::TooLarge => {
                "HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            }
        }
    }
}

/// Reads a WebSocket upgrade request from `stream` for `listener` (its path, whether it
/// trusts `Forwarded` and `X-Forwarded-For`), answers it, and returns the connection as a byte stream with
/// what the upgrade agreed. A refused request gets its HTTP error before the error returns.
///
/// Generic over the stream so that `wss://` runs it over a TLS stream. The caller bounds it
/// in time (the CONNECT deadline); it holds at most [`MAX_REQUEST`] bytes meanwhile.
pub(crate) async fn accept_websocket<S>(
    mut stream: S,
    listener: &Listener,
) -> Result<(WsStream<S>, Upgraded), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let path = listener.path.as_deref().unwrap_or(DEFAULT_PATH);
    let mut buf = Vec::with_capacity(INITIAL_REQUEST);
    let (len, accept, upgraded) = loop {
        let room = MAX_REQUEST.saturating_sub(buf.len());
        let checked = if room == 0 {
            Err(Refusal::TooLarge)
        } else if stream.read_buf(&mut (&mut buf).limit(room)).await? == 0 {
            return Err(HandshakeError::Closed);
        } else {
            check_request(&buf, path, listener.trust_proxy)
        };
        match checked {
            Ok(Some(accepted)) => break accepted,
            Ok(None) => {}
            Err(refusal) => {
                // The refusal is the news; whether the client reads it is its business.
                let _ = stream.write_all(refusal.response().as_bytes()).await;
                let _ = stream.shutdown().await;
                return Err(refusal.into());
            }
        }
    };
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(protocol) = upgraded.subprotocol {
        response.push_str("Sec-WebSocket-Protocol: ");
        response.push_str(protocol);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    stream.write_all(response.as_bytes()).await?;
    stream.flush().await?;
    // A client may send its first frames right behind the request.
    let rest = buf.get(len..).unwrap_or_default();
    Ok((WsStream::new(Prefixed::new(stream, rest)), upgraded))
}

/// Checks the upgrade request at the start of `buf`: `Ok(None)` while it is incomplete, else
/// its length, the `Sec-WebSocket-Accept` value and what was agreed.
fn check_request(
    buf: &[u8],
    path: &str,
    trust_proxy: bool,
) -> Result<Option<(usize, String, Upgraded)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooLarge),
        Err(_) => return Err(Refusal::Malformed),
    };
    if request.version != Some(1) {
        return Err(Refusal::Malformed);
    }
    let method = request.method.unwrap_or_default();
    if method != "GET" {
        return Err(Refusal::Method(method.chars().take(16).collect()));
    }
    let target = request.path.unwrap_or_default();
    let asked = target.split('?').next().unwrap_or_default();
    if asked != path && asked.strip_suffix('/') != Some(path) {
        return Err(Refusal::NotFound(asked.chars().take(64).collect()));
    }
    let headers = request.headers;
    if !has_token(headers, "upgrade", "websocket") || !has_token(headers, "connection", "upgrade") {
        return Err(Refusal::NotUpgrade);
    }
    if values(headers, "sec-websocket-version").next() != Some(&b"13"[..]) {
        return Err(Refusal::Version);
    }
    let key = values(headers, "sec-websocket-key")
        .next()
        .map(<[u8]>::trim_ascii)
        .ok_or(Refusal::Key)?;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(nonce) if nonce.len() == 16 => {}
        _ => return Err(Refusal::Key),
    }
    let mut offered = tokens(headers, "sec-websocket-protocol").peekable();
    let subprotocol = if offered.peek().is_none() {
        // Offering none is what some clients do; Mosquitto accepts them too.
        None
    } else {
        let offers: Vec<&[u8]> = offered.collect();
        let chosen = offers.iter().find_map(|offer| {
            SUBPROTOCOLS
                .iter()
                .find(|known| known.as_bytes() == *offer)
                .copied()
        });
        match chosen {
            Some(chosen) => Some(chosen),
            None => {
                let list = offers
                    .iter()
                    .map(|o| String::from_utf8_lossy(o))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(Refusal::Subprotocol(list.chars().take(64).collect()));
            }
        }
    };
    let forwarded_for = if trust_proxy {
        client_address(headers)
    } else {
        None
    };
    let accept = accept_key(key);
    Ok(Some((
        len,
        accept,
        Upgraded {
            subprotocol,
            forwarded_for,
        },
    )))
}

/// The values of every header named `name` (ASCII case-insensitive), in order.
fn values<'h>(
    headers: &'h [httparse::Header<'h>],
    name: &'static str,
) -> impl Iterator<Item = &'h [u8]> + 'h {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The comma-separated elements of every header named `name`, trimmed, empty ones skipped.
fn tokens<'h>(
    headers: &'h [httparse::Header<'h>],
    name: &'static str,
) -> impl Iterator<Item = &'h [u8]> + 'h {
    values(headers, name)
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Whether a header named `name` lists `token` (ASCII case-insensitive).
fn has_token(headers: &[httparse::Header<'_>], name: &'static str, token: &str) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The client's address as a trusted proxy reports it: the `for=` of the first element of
/// `Forwarded` (RFC 7239), else the first address of `X-Forwarded-For`; `None` when neither
/// names one, and the socket's address stands. Ports are dropped, as X-Forwarded-For has none.
fn client_address(headers: &[httparse::Header<'_>]) -> Option<IpAddr> {
    forwarded(headers).or_else(|| forwarded_for(headers))
}

/// The node of the `for=` parameter of the first (client-most) element of the first
/// `Forwarded` header (RFC 7239, 4 and 6): an IPv4 address or a bracketed IPv6 one, with or
/// without a port, quoted or not. `unknown`, an obfuscated identifier (`_hidden`), a
/// parameter given twice, an unterminated quote or anything else gives `None`.
fn forwarded(headers: &[httparse::Header<'_>]) -> Option<IpAddr> {
    let value = values(headers, "forwarded").next()?;
    let parsed = forwarded_for_param(value).and_then(|node| parse_node(&node));
    if parsed.is_none() {
        debug!(value = %String::from_utf8_lossy(value), "Forwarded without a client address");
    }
    parsed
}

/// The unquoted value of the only `for` parameter of the first element of a `Forwarded` value.
fn forwarded_for_param(value: &[u8]) -> Option<String> {
    // The pairs of the first element: split at `;` up to the first `,`, outside quotes.
    let mut pairs = Vec::new();
    let (mut start, mut end) = (0, value.len());
    let (mut quoted, mut escaped) = (false, false);
    for (i, &b) in value.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b';' if !quoted => {
                pairs.push(value.get(start..i)?);
                start = i + 1;
            }
            b',' if !quoted => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    if quoted {
        return None;
    }
    pairs.push(value.get(start..end)?);
    let mut found = None;
    for pair in pairs.into_iter().map(<[u8]>::trim_ascii) {
        if pair.is_empty() {
            continue;
        }
        let eq = pair.iter().position(|&b| b == b'=')?;
        let (name, rest) = pair.split_at(eq);
        if !name.trim_ascii().eq_ignore_ascii_case(b"for") {
            continue;
        }
        if found.is_some() {
            // RFC 7239, 4: a parameter must not occur twice in an element.
            return None;
        }
        found = Some(unquote(rest.get(1..)?.trim_ascii())?);
    }
    found
}

/// A token as it is, or a quoted string without its quotes and escapes.
fn unquote(value: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?;
    let Some(inner) = text.strip_prefix('"') else {
        return Some(text.to_owned());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' { chars.next()? } else { c });
    }
    Some(out)
}

/// An RFC 7239 node naming an address: `IPv4[:port]` or `[IPv6][:port]`, the port digits or
/// obfuscated (`_x`). `unknown` and obfuscated nodes name none.
fn parse_node(node: &str) -> Option<IpAddr> {
    let (ip, port) = match node.strip_prefix('[') {
        Some(v6) => {
            let (ip, rest) = v6.split_once(']')?;
            (IpAddr::V6(ip.parse().ok()?), rest)
        }
        None => {
            let (ip, rest) = node.split_at(node.find(':').unwrap_or(node.len()));
            (IpAddr::V4(ip.parse().ok()?), rest)
        }
    };
    let port_ok = match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(obfuscated) if obfuscated.starts_with('_') => {
            obfuscated.len() > 1
                && obfuscated
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        }
        Some(digits) => digits.parse::<u16>().is_ok() && digits.bytes().all(|b| b.is_ascii_digit()),
    };
    port_ok.then_some(ip)
}

/// The first address of the first `X-Forwarded-For` header: the client, as the first proxy
/// saw it. Accepts an address with a port too, as some proxies write it.
fn forwarded_for(headers: &[httparse::Header<'_>]) -> Option<IpAddr> {
    let value = values(headers, "x-forwarded-for").next()?;
    let first = value.split(|&b| b == b',').next()?.trim_ascii();
    let text = std::str::from_utf8(first).ok()?;
    let parsed = text
        .parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            text.strip_prefix('[')
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse().ok())
        });
    if parsed.is_none() {
        debug!(value = %String::from_utf8_lossy(value), "X-Forwarded-For without a client address");
    }
    parsed
}

/// `Sec-WebSocket-Accept` for `key`: base64 of the SHA-1 of the key and the RFC's GUID.
fn accept_key(key: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha1.finalize())
}

// ---- Frames ---------------------------------------------------------------------------

/// A frame the client must not send: the connection closes with the frame's close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum FrameError {
    /// A text frame: MQTT travels in binary frames (MQTT 5, 6.0).
    #[error("text frame (MQTT travels in binary frames)")]
    Text,
    /// An unmasked frame (RFC 6455, 5.1).
    #[error("unmasked frame from the client")]
    Unmasked,
    /// Reserved bits set without an extension agreed.
    #[error("reserved bits set")]
    Reserved,
    /// An opcode RFC 6455 does not define.
    #[error("unknown opcode {0:#x}")]
    Opcode(u8),
    /// A fragmented control frame, or one longer than 125 bytes.
    #[error("fragmented or oversized control frame")]
    Control,
    /// A continuation frame with no message to continue.
    #[error("continuation frame outside a message")]
    Continuation,
    /// A new message before the previous one's final frame.
    #[error("new message before the previous one ended")]
    Interleaved,
    /// A 64-bit length with its top bit set.
    #[error("frame length out of range")]
    Length,
    /// A close frame with a one-byte payload.
    #[error("malformed close frame")]
    Close,
}

impl FrameError {
    /// The close code the connection ends with.
    fn close_code(self) -> u16 {
        match self {
            Self::Text => CLOSE_UNSUPPORTED_DATA,
            _ => CLOSE_PROTOCOL_ERROR,
        }
    }
}

/// A control frame to send, whole, between data frames.
#[derive(Debug, Clone, Copy)]
struct Control {
    bytes: [u8; 2 + MAX_CONTROL],
    len: usize,
    /// How much was written.
    pos: usize,
}

impl Control {
    fn new(opcode: u8, payload: &[u8]) -> Self {
        let payload = payload.get(..MAX_CONTROL).unwrap_or(payload);
        let mut bytes = [0; 2 + MAX_CONTROL];
        bytes[0] = 0x80 | opcode;
        // At most 125: fits the 7-bit length.
        bytes[1] = payload.len() as u8;
        for (dst, src) in bytes.iter_mut().skip(2).zip(payload) {
            *dst = *src;
        }
        Self {
            bytes,
            len: 2 + payload.len(),
            pos: 0,
        }
    }

    fn close(code: u16) -> Self {
        Self::new(OP_CLOSE, &code.to_be_bytes())
    }

    fn unsent(&self) -> &[u8] {
        self.bytes.get(self.pos..self.len).unwrap_or_default()
    }

    fn is_close(&self) -> bool {
        self.bytes[0] & 0x0f == OP_CLOSE
    }
}

/// Where the decoder is in the client's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Gathering a frame header.
    Header,
    /// In a binary frame's payload (or a continuation's): passed on, unmasked.
    Data,
    /// In a control frame's payload: gathered.
    Control(u8),
    /// After the client's close frame: the rest is ignored.
    Closed,
}

/// The client's frames, decoded in place (sans-IO): [`Decoder::decode`] turns received bytes
/// into the binary payload they carry, and leaves what to answer in [`Decoder::pong`] and
/// [`Decoder::close`].
#[derive(Debug)]
struct Decoder {
    part: Part,
    header: [u8; MAX_HEADER],
    /// Header bytes gathered.
    header_len: usize,
    /// Payload bytes left in the current frame.
    remaining: u64,
    mask: [u8; 4],
    /// The mask's offset at the next payload byte.
    mask_pos: usize,
    /// A binary message has begun and its final frame has not come.
    fragmented: bool,
    control: [u8; MAX_CONTROL],
    control_len: usize,
    /// The pong answering the latest ping, until sent.
    pong: Option<Control>,
    /// The close frame answering the client's, once it came.
    close: Option<Control>,
}

impl Decoder {
    fn new() -> Self {
        Self {
            part: Part::Header,
            header: [0; MAX_HEADER],
            header_len: 0,
            remaining: 0,
            mask: [0; 4],
            mask_pos: 0,
            fragmented: false,
            control: [0; MAX_CONTROL],
            control_len: 0,
            pong: None,
            close: None,
        }
    }

    /// Whether the client sent its close frame.
    fn is_closed(&self) -> bool {
        self.part == Part::Closed
    }

    /// Decodes `data`, received from the client, in place: moves the binary payload it
    /// carries, unmasked, to its front and returns its length, with the error that stopped
    /// the decoding, if any (the payload before it is good). Everything after the client's
    /// close frame is dropped.
    fn decode(&mut self, data: &mut [u8]) -> (usize, Result<(), FrameError>) {
        let mut kept = 0;
        let result = self.decode_into(data, &mut kept);
        (kept, result)
    }

    fn decode_into(&mut self, data: &mut [u8], kept: &mut usize) -> Result<(), FrameError> {
        let mut read = 0;
        while read < data.len() {
            let left = data.len() - read;
            match self.part {
                Part::Closed => break,
                Part::Header => {
                    let take = (self.header_needed() - self.header_len).min(left);
                    let src = data.get(read..read + take).unwrap_or_default();
                    for (dst, src) in self.header.iter_mut().skip(self.header_len).zip(src) {
                        *dst = *src;
                    }
                    self.header_len += take;
                    read += take;
                    if self.header_len == 2 {
                        self.check_start()?;
                    }
                    if self.header_len >= 2 && self.header_len == self.header_needed() {
                        self.start_frame()?;
                    }
                }
                Part::Data => {
                    let take = usize::try_from(self.remaining)
                        .unwrap_or(usize::MAX)
                        .min(left);
                    if *kept != read {
                        data.copy_within(read..read + take, *kept);
                    }
                    if let Some(payload) = data.get_mut(*kept..*kept + take) {
                        unmask(payload, self.mask, self.mask_pos);
                    }
                    self.mask_pos = (self.mask_pos + take) % 4;
                    self.remaining -= take as u64;
                    *kept += take;
                    read += take;
                    if self.remaining == 0 {
                        self.part = Part::Header;
                    }
                }
                Part::Control(opcode) => {
                    let take = usize::try_from(self.remaining)
                        .unwrap_or(usize::MAX)
                        .min(left);
                    let src = data.get(read..read + take).unwrap_or_default();
                    let start = self.control_len;
                    for (dst, src) in self.control.iter_mut().skip(start).zip(src) {
                        *dst = *src;
                    }
                    if let Some(payload) = self.control.get_mut(start..start + take) {
                        unmask(payload, self.mask, self.mask_pos);
                    }
                    self.mask_pos = (self.mask_pos + take) % 4;
                    self.control_len += take;
                    self.remaining -= take as u64;
                    read += take;
                    if self.remaining == 0 {
                        self.end_control(opcode)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// How long the header being gathered is, as far as its first two bytes tell.
    fn header_needed(&self) -> usize {
        if self.header_len < 2 {
            return 2;
        }
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    /// Checks a frame's first two bytes, before the rest of its header is waited for.
    fn check_start(&self) -> Result<(), FrameError> {
        let [b0, b1, ..] = self.header;
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        if b0 & 0x70 != 0 {
            return Err(FrameError::Reserved);
        }
        if b1 & 0x80 == 0 {
            return Err(FrameError::Unmasked);
        }
        match opcode {
            OP_CONTINUATION if !self.fragmented => Err(FrameError::Continuation),
            OP_CONTINUATION => Ok(()),
            OP_TEXT => Err(FrameError::Text),
            OP_BINARY if self.fragmented => Err(FrameError::Interleaved),
            OP_BINARY => Ok(()),
            OP_CLOSE | OP_PING | OP_PONG if !fin || usize::from(b1 & 0x7f) > MAX_CONTROL => {
                Err(FrameError::Control)
            }
            OP_CLOSE | OP_PING | OP_PONG => Ok(()),
            other => Err(FrameError::Opcode(other)),
        }
    }

    /// Starts the frame whose header is complete.
    fn start_frame(&mut self) -> Result<(), FrameError> {
        let [b0, b1, rest @ ..] = self.header;
        let (len, mask_at) = match b1 & 0x7f {
            126 => (u64::from(u16::from_be_bytes([rest[0], rest[1]])), 2),
            127 => {
                let len = u64::from_be_bytes([
                    rest[0], rest[1], rest[2], rest[3], rest[4], rest[5], rest[6], rest[7],
                ]);
                if len >> 63 != 0 {
                    return Err(FrameError::Length);
                }
                (len, 8)
            }
            short => (u64::from(short), 0),
        };
        self.mask = [
            rest[mask_at],
            rest[mask_at + 1],
            rest[mask_at + 2],
            rest[mask_at + 3],
        ];
        self.mask_pos = 0;
        self.header_len = 0;
        self.remaining = len;
        let opcode = b0 & 0x0f;
        if matches!(opcode, OP_BINARY | OP_CONTINUATION) {
            self.fragmented = b0 & 0x80 == 0;
            self.part = if len > 0 { Part::Data } else { Part::Header };
        } else {
            self.control_len = 0;
            self.part = Part::Control(opcode);
            if len == 0 {
                self.end_control(opcode)?;
            }
        }
        Ok(())
    }

    /// Acts on a complete control frame.
    fn end_control(&mut self, opcode: u8) -> Result<(), FrameError> {
        let payload = self.control.get(..self.control_len).unwrap_or_default();
        self.part = Part::Header;
        match opcode {
            OP_PING => self.pong = Some(Control::new(OP_PONG, payload)),
            OP_CLOSE => {
                // Echo the client's status code, as RFC 6455 (5.5.1) suggests.
                let code = match payload {
                    [] => CLOSE_NORMAL,
                    [hi, lo, ..] => match u16::from_be_bytes([*hi, *lo]) {
                        // Codes a peer may send (1004 to 1006 and 1015 are for local use).
                        code @ (1000..=1003 | 1007..=1014 | 3000..=4999) => code,
                        _ => CLOSE_PROTOCOL_ERROR,
                    },
                    [_] => return Err(FrameError::Close),
                };
                self.close = Some(Control::close(code));
                self.part = Part::Closed;
            }
            _ => {}
        }
        Ok(())
    }
}

/// XORs `data` with `mask`, starting at the mask's byte `offset`.
fn unmask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut mask = mask;
    mask.rotate_left(offset % 4);
    let [a, b, c, d] = mask;
    let wide = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        if let Ok(bytes) = <[u8; 8]>::try_from(&*chunk) {
            chunk.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ wide).to_ne_bytes());
        }
    }
    // Chunks are whole multiples of the mask, so the remainder starts at its offset 0.
    for (byte, m) in chunks.into_remainder().iter_mut().zip(mask.iter().cycle()) {
        *byte ^= m;
    }
}

/// A bad frame as the reader's error.
fn frame_error(error: FrameError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

/// The header of a final binary frame of `len` bytes, and its length.
fn data_header(len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x80 | OP_BINARY;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if let Ok(short) = u16::try_from(len) {
        h[1] = 126;
        h[2..4].copy_from_slice(&short.to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

// ---- The stream -------------------------------------------------------------------------

/// A WebSocket connection as the byte stream of MQTT it carries (see the module docs).
#[derive(Debug)]
pub(crate) struct WsStream<S> {
    inner: Prefixed<S>,
    /// Boxed: the driver's future holds its stream in several of its states, and its split
    /// halves share it; the WebSocket state (about 900 bytes) is then paid once.
    st: Box<State>,
}

/// The WebSocket side of a [`WsStream`].
#[derive(Debug)]
struct State {
    rx: Decoder,
    /// The client's frames ended (a close frame, an error, the end of the stream).
    rx_done: bool,
    /// A bad frame, reported by the read after the one that passed on the payload before it.
    failed: Option<FrameError>,
    /// The header of the binary frame being sent, and how much of it was written.
    tx_header: [u8; 10],
    tx_header_len: usize,
    tx_header_pos: usize,
    /// Payload bytes of the frame being sent not written yet.
    tx_remaining: usize,
    /// The control frame being written.
    sending: Option<Control>,
    /// Our close frame, when the connection ends with an error; else a normal close is sent
    /// at shutdown.
    close: Option<Control>,
    /// A close frame went out: nothing may follow it.
    close_sent: bool,
}

impl State {
    /// Whether no data frame is half written, so that a control frame may go.
    fn at_frame_boundary(&self) -> bool {
        self.tx_header_pos == self.tx_header_len && self.tx_remaining == 0
    }

    /// Whether a control frame waits to go.
    fn control_pending(&self) -> bool {
        self.sending.is_some()
            || self.rx.pong.is_some()
            || self.rx.close.is_some()
            || self.close.is_some()
    }
}

impl<S> WsStream<S> {
    fn new(inner: Prefixed<S>) -> Self {
        Self {
            inner,
            st: Box::new(State {
                rx: Decoder::new(),
                rx_done: false,
                failed: None,
                tx_header: [0; 10],
                tx_header_len: 0,
                tx_header_pos: 0,
                tx_remaining: 0,
                sending: None,
                close: None,
                close_sent: false,
            }),
        }
    }
}

impl<S: AsyncWrite + Unpin> WsStream<S> {
    /// Writes the pending control frames (a pong, then a close) if no data frame is half
    /// written. Ready once there is nothing it can send now.
    fn poll_control(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.st.at_frame_boundary() {
                return Poll::Ready(Ok(()));
            }
            let Some(control) = &mut self.st.sending else {
                if self.st.close_sent {
                    self.st.rx.pong = None;
                    return Poll::Ready(Ok(()));
                }
                self.st.sending = self
                    .st
                    .rx
                    .pong
                    .take()
                    .or_else(|| self.st.rx.close.take())
                    .or_else(|| self.st.close.take());
                if self.st.sending.is_none() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            };
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, control.unsent()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            control.pos += n;
            if control.unsent().is_empty() {
                self.st.close_sent |= control.is_close();
                self.st.sending = None;
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(error) = this.st.failed.take() {
            return Poll::Ready(Err(frame_error(error)));
        }
        // Pongs go out even while the driver only reads.
        if this.st.control_pending() && this.poll_control(cx)?.is_ready() {
            let _ = Pin::new(&mut this.inner).poll_flush(cx)?;
        }
        loop {
            if this.st.rx_done || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let start = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let end = buf.filled().len();
            if end == start {
                this.st.rx_done = true;
                return Poll::Ready(Ok(()));
            }
            let (kept, result) = match buf.filled_mut().get_mut(start..end) {
                Some(received) => this.st.rx.decode(received),
                None => (0, Ok(())),
            };
            buf.set_filled(start + kept);
            if let Err(error) = result {
                this.st.rx_done = true;
                this.st.close = Some(Control::close(error.close_code()));
                // The error is the news; a failed write of the close frame adds nothing.
                let _ = this.poll_control(cx);
                if kept == 0 {
                    return Poll::Ready(Err(frame_error(error)));
                }
                // The payload before the bad frame goes on first; the error with the next read.
                this.st.failed = Some(error);
                return Poll::Ready(Ok(()));
            }
            this.st.rx_done = this.st.rx.is_closed();
            if this.st.control_pending() && this.poll_control(cx)?.is_ready() {
                let _ = Pin::new(&mut this.inner).poll_flush(cx)?;
            }
            if kept > 0 {
                return Poll::Ready(Ok(()));
            }
            // Only headers and control frames came: read on.
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(this.poll_control(cx))?;
        if this.st.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        loop {
            if this.st.at_frame_boundary() {
                let len = buf.len().min(MAX_OUT_FRAME);
                let (header, header_len) = data_header(len);
                this.st.tx_header = header;
                this.st.tx_header_len = header_len;
                this.st.tx_header_pos = 0;
                this.st.tx_remaining = len;
            }
            let payload = buf
                .get(..this.st.tx_remaining.min(buf.len()))
                .unwrap_or_default();
            let header = this
                .st
                .tx_header
                .get(this.st.tx_header_pos..this.st.tx_header_len)
                .unwrap_or_default();
            if header.is_empty() {
                let n = ready!(Pin::new(&mut this.inner).poll_write(cx, payload))?;
                this.st.tx_remaining -= n.min(this.st.tx_remaining);
                return Poll::Ready(Ok(n));
            }
            let bufs = [IoSlice::new(header), IoSlice::new(payload)];
            let n = match Pin::new(&mut this.inner).poll_write_vectored(cx, &bufs) {
                Poll::Ready(result) => result?,
                Poll::Pending => {
                    if this.st.tx_header_pos == 0 {
                        // Nothing of this frame went out: the next write plans it afresh.
                        this.st.tx_header_len = 0;
                        this.st.tx_remaining = 0;
                    }
                    return Poll::Pending;
                }
            };
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            let of_header = n.min(header.len());
            this.st.tx_header_pos += of_header;
            let of_payload = n - of_header;
            this.st.tx_remaining -= of_payload.min(this.st.tx_remaining);
            if of_payload > 0 {
                return Poll::Ready(Ok(of_payload));
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_control(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let closing = this.st.sending.is_some_and(|c| c.is_close())
            || this.st.rx.close.is_some()
            || this.st.close.is_some();
        if !this.st.close_sent && !closing {
            this.st.close = Some(Control::close(CLOSE_NORMAL));
        }
        // A half-written data frame cannot be completed here: the close frame is skipped.
        ready!(this.poll_control(cx))?;
        ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
