//! The frames of the forwarding link, sans-IO: route deltas and snapshots, resync requests and
//! forwarded messages.
//!
//! Every frame is a 4-byte big-endian length, then that many bytes: a tag byte and the body.
//! Route frames carry JSON (they are rare and small, and the rest of the cluster link speaks
//! JSON); a message frame is binary, so that a payload travels as it is:
//!
//! ```text
//! origin u64 | flags u8 (bits 0-1 QoS, 2 retain, 3 payload format present, 4 its value,
//!              5 expiry present) | [expiry u32] | topic str | content type opt-str |
//! response topic opt-str | correlation data opt-bytes | user properties u32 count, str pairs |
//! share groups u32 count, strs | payload (the rest of the frame)
//! ```
//!
//! where `str` and `bytes` are a u32 length and the bytes, and `opt-` a 0/1 byte before them.

use bytes::Bytes;

use crate::routes::{RouteDelta, RouteSnapshot};
use crate::state::NodeId;

/// The ALPN of the forwarding link (the Raft link's is [`crate::network::ALPN`]).
pub const FORWARD_ALPN: &[u8] = b"mqttd-cluster-fwd/1";

/// The largest message frame read: a message bigger than this is not forwarded.
pub const MAX_MESSAGE_FRAME: usize = 16 * 1024 * 1024;

/// The largest route frame read (a snapshot of a node's routes).
pub const MAX_ROUTE_FRAME: usize = 64 * 1024 * 1024;

const TAG_SNAPSHOT: u8 = 1;
const TAG_DELTA: u8 = 2;
const TAG_RESYNC: u8 = 3;
const TAG_MESSAGE: u8 = 4;

/// The end-to-end MQTT 5 properties a forwarded message keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageProperties {
    /// Payload format indicator (true: UTF-8).
    pub payload_format_indicator: Option<bool>,
    /// What is left of the message expiry interval, in seconds, when it was forwarded.
    pub message_expiry_interval: Option<u32>,
    /// Content type.
    pub content_type: Option<String>,
    /// Response topic.
    pub response_topic: Option<String>,
    /// Correlation data.
    pub correlation_data: Option<Bytes>,
    /// User properties, in order.
    pub user_properties: Vec<(String, String)>,
}

/// A message published on one node for subscribers on another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedMessage {
    /// The node it was published on: a forwarded message is delivered locally, never
    /// forwarded again.
    pub origin: NodeId,
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
    /// The QoS it was published with (0-2); the link itself delivers at most once.
    pub qos: u8,
    /// The retain flag as published.
    pub retain: bool,
    /// End-to-end properties.
    pub properties: MessageProperties,
    /// The share groups the receiving node serves with this message (one member each);
    /// the origin picked one node per group.
    pub share_groups: Vec<String>,
}

impl ForwardedMessage {
    /// A message with no properties, from `origin`.
    pub fn new(origin: NodeId, topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            origin,
            topic: topic.into(),
            payload: payload.into(),
            qos: 0,
            retain: false,
            properties: MessageProperties::default(),
            share_groups: Vec::new(),
        }
    }

    /// Roughly the bytes the message holds, for the forwarding queue's budget.
    pub fn size(&self) -> usize {
        let p = &self.properties;
        64 + self.topic.len()
            + self.payload.len()
            + p.content_type.as_ref().map_or(0, String::len)
            + p.response_topic.as_ref().map_or(0, String::len)
            + p.correlation_data.as_ref().map_or(0, Bytes::len)
            + p.user_properties
                .iter()
                .map(|(k, v)| 16 + k.len() + v.len())
                .sum::<usize>()
            + self
                .share_groups
                .iter()
                .map(|g| 16 + g.len())
                .sum::<usize>()
    }
}

/// One frame of the forwarding link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// All of the sender's routes (routes stream, sender to receiver).
    Snapshot(RouteSnapshot),
    /// One change of the sender's routes (routes stream, sender to receiver).
    Delta(RouteDelta),
    /// The receiver saw a gap and asks for a snapshot (routes stream, receiver to sender).
    Resync,
    /// A forwarded message (a bucket's stream).
    Message(ForwardedMessage),
}

/// Why a frame cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The length prefix is above the limit for the stream.
    #[error("frame of {len} bytes, above the limit of {max}")]
    TooLong {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame is empty or has an unknown tag.
    #[error("unknown frame tag {0:?}")]
    Tag(Option<u8>),
    /// The body ends before a field.
    #[error("frame truncated in {0}")]
    Truncated(&'static str),
    /// A string is not UTF-8.
    #[error("{0} is not UTF-8")]
    Utf8(&'static str),
    /// A field has a value outside its range.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// A route frame's JSON is malformed.
    #[error("route frame: {0}")]
    Json(String),
}

/// The body's length from a frame's 4-byte prefix, refused above `max`.
pub fn frame_len(prefix: [u8; 4], max: usize) -> Result<usize, WireError> {
    let len = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
    if len > max {
        return Err(WireError::TooLong { len, max });
    }
    Ok(len)
}

impl Frame {
    /// The frame with its length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0; 4];
        match self {
            Self::Snapshot(s) => {
                out.push(TAG_SNAPSHOT);
                json(&mut out, s);
            }
            Self::Delta(d) => {
                out.push(TAG_DELTA);
                json(&mut out, d);
            }
            Self::Resync => out.push(TAG_RESYNC),
            Self::Message(m) => {
                out.push(TAG_MESSAGE);
                encode_message(&mut out, m);
            }
        }
        let len = u32::try_from(out.len() - 4).unwrap_or(u32::MAX);
        out.splice(0..4, len.to_be_bytes());
        out
    }

    /// Reads a frame's body (without its length prefix). A payload is a slice of `body`.
    pub fn decode(body: Bytes) -> Result<Self, WireError> {
        let tag = body.first().copied();
        let rest = body.slice(usize::from(tag.is_some())..);
        match tag {
            Some(TAG_SNAPSHOT) => serde_json::from_slice(&rest)
                .map(Self::Snapshot)
                .map_err(|e| WireError::Json(e.to_string())),
            Some(TAG_DELTA) => serde_json::from_slice(&rest)
                .map(Self::Delta)
                .map_err(|e| WireError::Json(e.to_string())),
            Some(TAG_RESYNC) => Ok(Self::Resync),
            Some(TAG_MESSAGE) => decode_message(rest).map(Self::Message),
            other => Err(WireError::Tag(other)),
        }
    }
}

fn json<T: serde::Serialize>(out: &mut Vec<u8>, value: &T) {
    // Route types serialize infallibly (strings, integers, enums without maps).
    if let Err(e) = serde_json::to_writer(&mut *out, value) {
        tracing::error!(error = %e, "a route frame did not serialize");
    }
}

const FLAG_RETAIN: u8 = 1 << 2;
const FLAG_FORMAT: u8 = 1 << 3;
const FLAG_UTF8: u8 = 1 << 4;
const FLAG_EXPIRY: u8 = 1 << 5;

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_opt(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            put_bytes(out, b);
        }
    }
}

fn encode_message(out: &mut Vec<u8>, m: &ForwardedMessage) {
    let p = &m.properties;
    out.extend_from_slice(&m.origin.to_be_bytes());
    let mut flags = m.qos & 3;
    if m.retain {
        flags |= FLAG_RETAIN;
    }
    if let Some(utf8) = p.payload_format_indicator {
        flags |= FLAG_FORMAT;
        if utf8 {
            flags |= FLAG_UTF8;
        }
    }
    if p.message_expiry_interval.is_some() {
        flags |= FLAG_EXPIRY;
    }
    out.push(flags);
    if let Some(e) = p.message_expiry_interval {
        out.extend_from_slice(&e.to_be_bytes());
    }
    put_bytes(out, m.topic.as_bytes());
    put_opt(out, p.content_type.as_deref().map(str::as_bytes));
    put_opt(out, p.response_topic.as_deref().map(str::as_bytes));
    put_opt(out, p.correlation_data.as_deref());
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes();
    out.extend_from_slice(&count(p.user_properties.len()));
    for (k, v) in &p.user_properties {
        put_bytes(out, k.as_bytes());
        put_bytes(out, v.as_bytes());
    }
    out.extend_from_slice(&count(m.share_groups.len()));
    for g in &m.share_groups {
        put_bytes(out, g.as_bytes());
    }
    out.extend_from_slice(&m.payload);
}

/// A reader over a frame's body; every read is checked.
struct Reader {
    buf: Bytes,
}

impl Reader {
    fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(what));
        }
        Ok(self.buf.split_to(n))
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let b = self.take(N, what)?;
        <[u8; N]>::try_from(b.as_ref()).map_err(|_| WireError::Truncated(what))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn bytes(&mut self, what: &'static str) -> Result<Bytes, WireError> {
        let len = usize::try_from(self.u32(what)?).map_err(|_| WireError::Truncated(what))?;
        self.take(len, what)
    }

    fn string(&mut self, what: &'static str) -> Result<String, WireError> {
        String::from_utf8(self.bytes(what)?.to_vec()).map_err(|_| WireError::Utf8(what))
    }

    fn opt<T>(
        &mut self,
        what: &'static str,
        read: impl FnOnce(&mut Self, &'static str) -> Result<T, WireError>,
    ) -> Result<Option<T>, WireError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => read(self, what).map(Some),
            _ => Err(WireError::Invalid(what)),
        }
    }

    /// A count of items that each take at least `min` bytes: refused if the body cannot
    /// hold them, so that a forged count does not reserve memory.
    fn count(&mut self, what: &'static str, min: usize) -> Result<usize, WireError> {
        let n = usize::try_from(self.u32(what)?).map_err(|_| WireError::Truncated(what))?;
        if n.saturating_mul(min) > self.buf.len() {
            return Err(WireError::Truncated(what));
        }
        Ok(n)
    }
}

fn decode_message(body: Bytes) -> Result<ForwardedMessage, WireError> {
    let mut r = Reader { buf: body };
    let origin = u64::from_be_bytes(r.array("origin")?);
    let flags = r.u8("flags")?;
    let qos = flags & 3;
    if qos == 3 || flags & 0b1100_0000 != 0 {
        return Err(WireError::Invalid("flags"));
    }
    let message_expiry_interval = if flags & FLAG_EXPIRY != 0 {
        Some(r.u32("message expiry")?)
    } else {
        None
    };
    let topic = r.string("topic")?;
    let content_type = r.opt("content type", Reader::string)?;
    let response_topic = r.opt("response topic", Reader::string)?;
    let correlation_data = r.opt("correlation data", Reader::bytes)?;
    let n = r.count("user properties", 8)?;
    let mut user_properties = Vec::with_capacity(n);
    for _ in 0..n {
        user_properties.push((r.string("user property")?, r.string("user property")?));
    }
    let n = r.count("share groups", 4)?;
    let mut share_groups = Vec::with_capacity(n);
    for _ in 0..n {
        share_groups.push(r.string("share group")?);
    }
    Ok(ForwardedMessage {
        origin,
        topic,
        payload: r.buf,
        qos,
        retain: flags & FLAG_RETAIN != 0,
        properties: MessageProperties {
            payload_format_indicator: (flags & FLAG_FORMAT != 0).then_some(flags & FLAG_UTF8 != 0),
            message_expiry_interval,
            content_type,
            response_topic,
            correlation_data,
            user_properties,
        },
        share_groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{Route, RouteOp};
    use proptest::prelude::*;

    fn roundtrip(frame: &Frame) -> Frame {
        let bytes = frame.encode();
        let prefix: [u8; 4] = bytes[..4].try_into().unwrap();
        let len = frame_len(prefix, MAX_ROUTE_FRAME).unwrap();
        assert_eq!(len, bytes.len() - 4);
        Frame::decode(Bytes::from(bytes).slice(4..)).unwrap()
    }

    #[test]
    fn route_frames_round_trip() {
        let route = Route {
            filter: "a/+".into(),
            group: Some("g".into()),
        };
        for f in [
            Frame::Resync,
            Frame::Delta(RouteDelta {
                node: 3,
                incarnation: 9,
                seq: 77,
                op: RouteOp::Remove,
                route: route.clone(),
            }),
            Frame::Snapshot(RouteSnapshot {
                node: 3,
                incarnation: 9,
                seq: 78,
                routes: vec![route],
            }),
        ] {
            assert_eq!(roundtrip(&f), f);
        }
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert_eq!(
            frame_len([0, 0, 0, 10], 9),
            Err(WireError::TooLong { len: 10, max: 9 })
        );
        assert_eq!(Frame::decode(Bytes::new()), Err(WireError::Tag(None)));
        assert_eq!(
            Frame::decode(Bytes::from_static(&[9])),
            Err(WireError::Tag(Some(9)))
        );
        // A count of user properties that the body cannot hold.
        let mut m = Frame::Message(ForwardedMessage::new(1, "t", "p")).encode();
        let at = 4 + 1 + 8 + 1 + 4 + 1 + 3;
        m[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Frame::decode(Bytes::from(m).slice(4..)).is_err());
    }

    fn message() -> impl Strategy<Value = ForwardedMessage> {
        let s = || "[a-z/+#$ é]{0,12}";
        (
            (
                any::<u64>(),
                s(),
                proptest::collection::vec(any::<u8>(), 0..64),
            ),
            (0u8..3, any::<bool>(), proptest::option::of(any::<bool>())),
            (
                proptest::option::of(any::<u32>()),
                proptest::option::of(s()),
                proptest::option::of(s()),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
            ),
            proptest::collection::vec((s(), s()), 0..4),
            proptest::collection::vec(s(), 0..3),
        )
            .prop_map(
                |((origin, topic, payload), (qos, retain, pfi), (exp, ct, rt, cd), up, groups)| {
                    ForwardedMessage {
                        origin,
                        topic,
                        payload: payload.into(),
                        qos,
                        retain,
                        properties: MessageProperties {
                            payload_format_indicator: pfi,
                            message_expiry_interval: exp,
                            content_type: ct,
                            response_topic: rt,
                            correlation_data: cd.map(Into::into),
                            user_properties: up,
                        },
                        share_groups: groups,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn messages_round_trip(m in message()) {
            let f = Frame::Message(m);
            prop_assert_eq!(roundtrip(&f), f);
        }

        #[test]
        fn any_body_decodes_or_errs(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Frame::decode(Bytes::from(body));
        }

        /// A message cut anywhere decodes to an error or (cut in its payload) to a message with
        /// a shorter payload; it never panics.
        #[test]
        fn truncated_messages_do_not_panic(m in message(), cut in any::<prop::sample::Index>()) {
            let payload = m.payload.len();
            let bytes = Frame::Message(m).encode();
            let at = 4 + cut.index(bytes.len() - 3);
            let fields_end = bytes.len() - payload;
            match Frame::decode(Bytes::from(bytes).slice(4..at)) {
                Ok(_) => prop_assert!(at >= fields_end),
                Err(_) => prop_assert!(at < fields_end),
            }
        }
    }
}
