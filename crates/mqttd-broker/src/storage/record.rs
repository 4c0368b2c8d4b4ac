//! The byte format of stored records.
//!
//! Every value starts with a format version and a CRC-32 of what follows, so a damaged record
//! is found and reported instead of being read as something else. Times are wall-clock
//! milliseconds since the Unix epoch: expiry keeps counting while the broker is down.
//! Decoding never panics and never trusts a length it has not checked against the input.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use mqttd_proto::session::OutboundState;
use mqttd_proto::{
    ClientId, Delivery, Message, MessageProperties, MqttStr, PacketId, QoS, RetainHandling,
    SubscriptionOptions, TopicFilter, TopicName, UserProperty, Will, WillProperties,
};

use super::{SessionRecord, StoredWill};

const FORMAT: u8 = 1;

/// Why a stored record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The record is shorter than its contents say.
    #[error("record is truncated")]
    Truncated,
    /// The checksum does not match: the bytes changed after they were written.
    #[error("checksum mismatch")]
    Checksum,
    /// A format this version does not know.
    #[error("unknown record format {0}")]
    Format(u8),
    /// A field holds a value no writer produces.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// Converts between the monotonic clock the broker runs on and wall-clock time, from one
/// pair of readings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    /// Monotonic now.
    pub(crate) instant: Instant,
    /// Wall-clock now.
    pub(crate) system: SystemTime,
}

impl Clock {
    /// Reads both clocks.
    pub(crate) fn now() -> Self {
        Self {
            instant: Instant::now(),
            system: SystemTime::now(),
        }
    }

    /// Wall-clock milliseconds for a monotonic instant.
    pub(crate) fn to_millis(self, at: Instant) -> u64 {
        let wall = match at.checked_duration_since(self.instant) {
            Some(ahead) => self.system + ahead,
            None => self.system - self.instant.duration_since(at),
        };
        millis(wall)
    }

    /// The monotonic instant for wall-clock milliseconds; a time before the process could
    /// represent is clamped to the earliest it can.
    pub(crate) fn to_instant(self, ms: u64) -> Instant {
        let wall = UNIX_EPOCH + Duration::from_millis(ms);
        match wall.duration_since(self.system) {
            Ok(ahead) => self.instant + ahead,
            Err(e) => self
                .instant
                .checked_sub(e.duration())
                .unwrap_or(self.instant),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The wall-clock time of epoch milliseconds.
pub(crate) fn system_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn seal(body: BytesMut) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(FORMAT);
    out.put_u32_le(crc32fast::hash(&body));
    out.extend_from_slice(&body);
    out.freeze()
}

fn open(value: &[u8]) -> Result<Reader<'_>, RecordError> {
    let mut r = Reader(value);
    let format = r.u8()?;
    if format != FORMAT {
        return Err(RecordError::Format(format));
    }
    let crc = r.u32_le()?;
    if crc32fast::hash(r.0) != crc {
        return Err(RecordError::Checksum);
    }
    Ok(r)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn need(&self, n: usize) -> Result<(), RecordError> {
        if self.0.remaining() < n {
            Err(RecordError::Truncated)
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    fn u32_le(&mut self) -> Result<u32, RecordError> {
        self.need(4)?;
        Ok(self.0.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    fn bytes(&mut self) -> Result<&'a [u8], RecordError> {
        let len = self.u32()? as usize;
        self.need(len)?;
        let (head, tail) = self.0.split_at(len);
        self.0 = tail;
        Ok(head)
    }
    fn string(&mut self) -> Result<MqttStr, RecordError> {
        MqttStr::from_bytes(Bytes::copy_from_slice(self.bytes()?))
            .map_err(|_| RecordError::Invalid("string"))
    }
    fn opt<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, RecordError>,
    ) -> Result<Option<T>, RecordError> {
        match self.u8()? {
            0 => Ok(None),
            1 => f(self).map(Some),
            _ => Err(RecordError::Invalid("option tag")),
        }
    }
    fn qos(&mut self) -> Result<QoS, RecordError> {
        QoS::from_bits(self.u8()?).ok_or(RecordError::Invalid("QoS"))
    }
    fn bool(&mut self) -> Result<bool, RecordError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(RecordError::Invalid("flag")),
        }
    }
    fn topic(&mut self) -> Result<TopicName, RecordError> {
        TopicName::new(self.string()?).map_err(|_| RecordError::Invalid("topic"))
    }
    fn filter(&mut self) -> Result<TopicFilter, RecordError> {
        TopicFilter::new(self.string()?).map_err(|_| RecordError::Invalid("topic filter"))
    }
    fn finish(&self) -> Result<(), RecordError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(RecordError::Invalid("trailing bytes"))
        }
    }
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(b);
}

fn put_opt<T>(out: &mut BytesMut, v: Option<&T>, f: impl FnOnce(&mut BytesMut, &T)) {
    match v {
        None => out.put_u8(0),
        Some(v) => {
            out.put_u8(1);
            f(out, v);
        }
    }
}

fn put_user_properties(out: &mut BytesMut, props: &[UserProperty]) {
    out.put_u32(props.len() as u32);
    for (k, v) in props {
        put_bytes(out, k.as_bytes());
        put_bytes(out, v.as_bytes());
    }
}

fn user_properties(r: &mut Reader<'_>) -> Result<Vec<UserProperty>, RecordError> {
    let n = r.u32()? as usize;
    // Each pair takes at least 8 bytes: a count beyond what is left is damage.
    if n > r.0.len() / 8 {
        return Err(RecordError::Truncated);
    }
    (0..n).map(|_| Ok((r.string()?, r.string()?))).collect()
}

fn put_message(out: &mut BytesMut, m: &Message, clock: &Clock) {
    put_bytes(out, m.topic.as_str().as_bytes());
    put_bytes(out, &m.payload);
    out.put_u8(m.qos.bits());
    out.put_u8(m.retain.into());
    out.put_u64(m.expires_at.map_or(0, |at| clock.to_millis(at).max(1)));
    let p = &m.properties;
    put_opt(out, p.payload_format_indicator.as_ref(), |o, v| {
        o.put_u8((*v).into())
    });
    put_opt(out, p.content_type.as_ref(), |o, v| {
        put_bytes(o, v.as_bytes())
    });
    put_opt(out, p.response_topic.as_ref(), |o, v| {
        put_bytes(o, v.as_str().as_bytes())
    });
    put_opt(out, p.correlation_data.as_ref(), |o, v| put_bytes(o, v));
    put_user_properties(out, &p.user_properties);
}

fn message(r: &mut Reader<'_>, clock: &Clock) -> Result<Message, RecordError> {
    let topic = r.topic()?;
    let payload = Bytes::copy_from_slice(r.bytes()?);
    let qos = r.qos()?;
    let retain = r.bool()?;
    let expires = r.u64()?;
    let properties = MessageProperties {
        payload_format_indicator: r.opt(Reader::bool)?,
        content_type: r.opt(Reader::string)?,
        response_topic: r.opt(Reader::topic)?,
        correlation_data: r.opt(|r| r.bytes().map(Bytes::copy_from_slice))?,
        user_properties: user_properties(r)?,
    };
    let mut message = Message::new(topic, payload, qos, retain);
    message.properties = properties;
    message.expires_at = (expires != 0).then(|| clock.to_instant(expires));
    Ok(message)
}

/// A retained message.
pub(crate) fn encode_message(m: &Message, clock: &Clock) -> Bytes {
    let mut out = BytesMut::with_capacity(64 + m.payload.len());
    put_message(&mut out, m, clock);
    seal(out)
}

/// Reads what [`encode_message`] wrote.
pub(crate) fn decode_message(value: &[u8], clock: &Clock) -> Result<Message, RecordError> {
    let mut r = open(value)?;
    let m = message(&mut r, clock)?;
    r.finish()?;
    Ok(m)
}

/// A message stored for one session.
pub(crate) fn encode_delivery(d: &Delivery, clock: &Clock) -> Bytes {
    let mut out = BytesMut::with_capacity(80 + d.message.payload.len());
    put_message(&mut out, &d.message, clock);
    out.put_u8(d.qos.bits());
    out.put_u8(d.retain.into());
    out.put_u16(d.subscription_ids.len() as u16);
    for id in &d.subscription_ids {
        out.put_u32(id.get());
    }
    put_opt(&mut out, d.shared.as_ref(), |o, f| {
        put_bytes(o, f.as_str().as_bytes())
    });
    seal(out)
}

/// Reads what [`encode_delivery`] wrote; `seq` is the key it was stored under.
pub(crate) fn decode_delivery(
    value: &[u8],
    seq: u64,
    clock: &Clock,
) -> Result<Delivery, RecordError> {
    let mut r = open(value)?;
    let message = Arc::new(message(&mut r, clock)?);
    let qos = r.qos()?;
    let retain = r.bool()?;
    let n = r.u16()?;
    let subscription_ids = (0..n)
        .map(|_| NonZeroU32::new(r.u32()?).ok_or(RecordError::Invalid("subscription identifier")))
        .collect::<Result<_, _>>()?;
    let shared = r.opt(Reader::filter)?;
    r.finish()?;
    Ok(Delivery {
        message,
        qos,
        retain,
        subscription_ids,
        shared,
        store_seq: Some(seq),
    })
}

/// Where a stored QoS 2 message's flow stands.
pub(crate) fn encode_flow(packet_id: PacketId, state: OutboundState) -> Bytes {
    let mut out = BytesMut::with_capacity(3);
    out.put_u16(packet_id.get());
    out.put_u8(match state {
        OutboundState::PublishSent => 1,
        OutboundState::ReleaseSent => 2,
    });
    seal(out)
}

/// Reads what [`encode_flow`] wrote.
pub(crate) fn decode_flow(value: &[u8]) -> Result<(PacketId, OutboundState), RecordError> {
    let mut r = open(value)?;
    let id = PacketId::new(r.u16()?).ok_or(RecordError::Invalid("packet identifier"))?;
    let state = match r.u8()? {
        1 => OutboundState::PublishSent,
        2 => OutboundState::ReleaseSent,
        _ => return Err(RecordError::Invalid("flow state")),
    };
    r.finish()?;
    Ok((id, state))
}

fn options_byte(o: &SubscriptionOptions) -> u8 {
    o.qos.bits()
        | u8::from(o.no_local) << 2
        | u8::from(o.retain_as_published) << 3
        | (o.retain_handling as u8) << 4
}

fn options(b: u8) -> Result<SubscriptionOptions, RecordError> {
    Ok(SubscriptionOptions {
        qos: QoS::from_bits(b & 3).ok_or(RecordError::Invalid("subscription QoS"))?,
        no_local: b & 4 != 0,
        retain_as_published: b & 8 != 0,
        retain_handling: match b >> 4 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(RecordError::Invalid("retain handling")),
        },
    })
}

fn put_will(out: &mut BytesMut, w: &StoredWill) {
    let will = &w.will;
    out.put_u32(w.delay);
    put_bytes(out, will.topic.as_str().as_bytes());
    put_bytes(out, &will.payload);
    out.put_u8(will.qos.bits());
    out.put_u8(will.retain.into());
    let p = &will.properties;
    put_opt(out, p.payload_format_indicator.as_ref(), |o, v| {
        o.put_u8((*v).into())
    });
    put_opt(out, p.message_expiry_interval.as_ref(), |o, v| {
        o.put_u32(*v)
    });
    put_opt(out, p.content_type.as_ref(), |o, v| {
        put_bytes(o, v.as_bytes())
    });
    put_opt(out, p.response_topic.as_ref(), |o, v| {
        put_bytes(o, v.as_str().as_bytes())
    });
    put_opt(out, p.correlation_data.as_ref(), |o, v| put_bytes(o, v));
    put_user_properties(out, &p.user_properties);
}

fn will(r: &mut Reader<'_>) -> Result<StoredWill, RecordError> {
    let delay = r.u32()?;
    let topic = r.topic()?;
    let payload = Bytes::copy_from_slice(r.bytes()?);
    let qos = r.qos()?;
    let retain = r.bool()?;
    let properties = WillProperties {
        will_delay_interval: (delay > 0).then_some(delay),
        payload_format_indicator: r.opt(Reader::bool)?,
        message_expiry_interval: r.opt(Reader::u32)?,
        content_type: r.opt(Reader::string)?,
        response_topic: r.opt(Reader::topic)?,
        correlation_data: r.opt(|r| r.bytes().map(Bytes::copy_from_slice))?,
        user_properties: user_properties(r)?,
    };
    Ok(StoredWill {
        will: Will {
            topic,
            payload,
            qos,
            retain,
            properties,
        },
        delay,
    })
}

/// A session's record: expiry, subscriptions, will, and when its connection ended.
pub(crate) fn encode_session(s: &SessionRecord) -> Bytes {
    let mut out = BytesMut::with_capacity(64 + 32 * s.subscriptions.len());
    out.put_u32(s.expiry_interval);
    out.put_u64(s.disconnected_at.map_or(0, |t| millis(t).max(1)));
    put_opt(&mut out, s.will.as_ref(), put_will);
    out.put_u32(s.subscriptions.len() as u32);
    for (filter, options, id) in &s.subscriptions {
        put_bytes(&mut out, filter.as_str().as_bytes());
        out.put_u8(options_byte(options));
        out.put_u32(id.map_or(0, NonZeroU32::get));
    }
    seal(out)
}

/// Reads what [`encode_session`] wrote; `client_id` is the key it was stored under.
pub(crate) fn decode_session(
    value: &[u8],
    client_id: ClientId,
) -> Result<SessionRecord, RecordError> {
    let mut r = open(value)?;
    let expiry_interval = r.u32()?;
    let disconnected = r.u64()?;
    let will = r.opt(will)?;
    let n = r.u32()? as usize;
    // Each subscription takes at least 9 bytes.
    if n > r.0.len() / 9 {
        return Err(RecordError::Truncated);
    }
    let subscriptions = (0..n)
        .map(|_| {
            let filter = r.filter()?;
            let options = options(r.u8()?)?;
            let id = NonZeroU32::new(r.u32()?);
            Ok((filter, options, id))
        })
        .collect::<Result<_, RecordError>>()?;
    r.finish()?;
    Ok(SessionRecord {
        client_id,
        expiry_interval,
        subscriptions,
        will,
        disconnected_at: (disconnected != 0).then(|| system_time(disconnected)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> MqttStr {
        MqttStr::try_from(v).unwrap()
    }

    fn sample_message(clock: &Clock) -> Message {
        let mut m = Message::new(
            TopicName::try_from("a/b").unwrap(),
            b"payload".to_vec(),
            QoS::ExactlyOnce,
            true,
        );
        m.properties = MessageProperties {
            payload_format_indicator: Some(true),
            content_type: Some(s("text/plain")),
            response_topic: Some(TopicName::try_from("reply/1").unwrap()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![(s("k"), s("v")), (s("k"), s("w"))],
        };
        m.expires_at = Some(clock.instant + Duration::from_secs(90));
        m
    }

    #[test]
    fn a_delivery_reads_back_as_written() {
        let clock = Clock::now();
        // Expiry is kept to the millisecond; it has its own test below.
        let mut message = sample_message(&clock);
        message.expires_at = None;
        let d = Delivery {
            message: Arc::new(message),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![NonZeroU32::new(7).unwrap(), NonZeroU32::new(9).unwrap()],
            shared: Some(TopicFilter::try_from("$share/g/a/#").unwrap()),
            store_seq: Some(42),
        };
        let back = decode_delivery(&encode_delivery(&d, &clock), 42, &clock).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn expiry_is_wall_clock_and_keeps_counting_across_a_restart() {
        let written = Clock::now();
        let m = sample_message(&written);
        let value = encode_message(&m, &written);
        // Read back "60 s later" by a process whose monotonic clock started afresh.
        let later = Clock {
            instant: written.instant,
            system: written.system + Duration::from_secs(60),
        };
        let back = decode_message(&value, &later).unwrap();
        let left = back.expires_at.unwrap() - later.instant;
        assert!(
            (29_000..=30_001).contains(&left.as_millis()),
            "{left:?} left of 90 s after 60 s"
        );
    }

    #[test]
    fn a_session_reads_back_as_written() {
        let record = SessionRecord {
            client_id: ClientId::try_from("c1").unwrap(),
            expiry_interval: 3600,
            subscriptions: vec![(
                TopicFilter::try_from("a/+").unwrap(),
                SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: RetainHandling::DoNotSend,
                },
                NonZeroU32::new(5),
            )],
            will: Some(StoredWill {
                will: Will {
                    topic: TopicName::try_from("will/c1").unwrap(),
                    payload: Bytes::from_static(b"gone"),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    properties: WillProperties {
                        will_delay_interval: Some(30),
                        message_expiry_interval: Some(10),
                        ..WillProperties::default()
                    },
                },
                delay: 30,
            }),
            disconnected_at: Some(system_time(1_700_000_000_123)),
        };
        let back = decode_session(&encode_session(&record), record.client_id.clone()).unwrap();
        assert_eq!(back, record);
    }

    proptest::proptest! {
        /// Whatever is on disk, with or without a valid checksum, reading it returns an error
        /// or a value, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let clock = Clock::now();
            let id = ClientId::try_from("c").unwrap();
            let mut sealed = BytesMut::new();
            sealed.extend_from_slice(&body);
            let sealed = seal(sealed);
            for value in [&body[..], &sealed[..]] {
                let _ = decode_message(value, &clock);
                let _ = decode_delivery(value, 1, &clock);
                let _ = decode_flow(value);
                let _ = decode_session(value, id.clone());
            }
        }
    }

    #[test]
    fn damage_is_detected_not_misread() {
        let clock = Clock::now();
        let value = encode_message(&sample_message(&clock), &clock);
        for i in 0..value.len() {
            let mut bad = value.to_vec();
            bad[i] ^= 0x40;
            assert!(decode_message(&bad, &clock).is_err(), "flip at byte {i}");
        }
        for len in 0..value.len() {
            assert!(
                decode_message(&value[..len], &clock).is_err(),
                "cut at {len}"
            );
        }
        let flow = encode_flow(PacketId::new(9).unwrap(), OutboundState::ReleaseSent);
        assert_eq!(
            decode_flow(&flow).unwrap(),
            (PacketId::new(9).unwrap(), OutboundState::ReleaseSent)
        );
    }
}
