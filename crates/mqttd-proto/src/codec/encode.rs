//! Encoding packets. `encoded_len` is exact, so a caller can check a peer's maximum packet
//! size before writing anything.

use bytes::BufMut;

use super::error::EncodeError;
use super::properties::{id, PropertySet};
use super::wire::{binary_len, put_binary, put_string, put_varint, varint_len};
use crate::packet::*;
use crate::reason::ReasonCode;
use crate::types::{ProtocolVersion, QoS};

const MAX_BINARY: usize = u16::MAX as usize;

impl Packet {
    /// The number of bytes [`Packet::encode`] writes for `version`.
    pub fn encoded_len(&self, version: ProtocolVersion) -> usize {
        let body = self.body_len(version);
        1 + varint_len(body as u32) + body
    }

    /// Writes the packet for `version`. Nothing is written if the packet cannot be encoded.
    pub fn encode(
        &self,
        version: ProtocolVersion,
        buf: &mut impl BufMut,
    ) -> Result<(), EncodeError> {
        self.check(version)?;
        let body = self.body_len(version);
        if body > MAX_REMAINING_LENGTH as usize {
            return Err(EncodeError::TooLarge);
        }
        buf.put_u8(self.first_byte());
        put_varint(buf, body as u32);
        self.write_body(version, buf);
        Ok(())
    }

    fn check(&self, version: ProtocolVersion) -> Result<(), EncodeError> {
        let too_long = |b: Option<&bytes::Bytes>| b.is_some_and(|b| b.len() > MAX_BINARY);
        match self {
            Self::Auth(_) if !version.is_v5() => Err(EncodeError::NotInVersion(PacketType::Auth)),
            Self::Publish(p) if (p.qos == QoS::AtMostOnce) != p.packet_id.is_none() => {
                Err(EncodeError::PacketIdMismatch)
            }
            Self::Publish(p) if too_long(p.properties.correlation_data.as_ref()) => {
                Err(EncodeError::TooLarge)
            }
            Self::Connect(c)
                if too_long(c.password.as_ref())
                    || too_long(c.properties.authentication_data.as_ref())
                    || c.will.as_ref().is_some_and(|w| {
                        w.payload.len() > MAX_BINARY
                            || too_long(w.properties.correlation_data.as_ref())
                    }) =>
            {
                Err(EncodeError::TooLarge)
            }
            Self::ConnAck(c) if too_long(c.properties.authentication_data.as_ref()) => {
                Err(EncodeError::TooLarge)
            }
            Self::Auth(a) if too_long(a.properties.authentication_data.as_ref()) => {
                Err(EncodeError::TooLarge)
            }
            _ => Ok(()),
        }
    }

    fn first_byte(&self) -> u8 {
        let nibble = (self.packet_type() as u8) << 4;
        match self {
            Self::Publish(p) => {
                nibble | (u8::from(p.dup) << 3) | (p.qos.bits() << 1) | u8::from(p.retain)
            }
            Self::PubRel(_) | Self::Subscribe(_) | Self::Unsubscribe(_) => nibble | 0x02,
            _ => nibble,
        }
    }

    fn body_len(&self, version: ProtocolVersion) -> usize {
        let v5 = version.is_v5();
        match self {
            Self::Connect(c) => connect_len(c),
            Self::ConnAck(c) => 2 + if v5 { c.properties.encoded_len() } else { 0 },
            Self::Publish(p) => {
                binary_len(p.topic.as_bytes())
                    + if p.packet_id.is_some() { 2 } else { 0 }
                    + if v5 { p.properties.encoded_len() } else { 0 }
                    + p.payload.len()
            }
            Self::PubAck(r) | Self::PubRec(r) | Self::PubRel(r) | Self::PubComp(r) => {
                2 + if v5 {
                    short_reason_len(r.reason, &r.properties)
                } else {
                    0
                }
            }
            Self::Subscribe(s) => {
                2 + if v5 { s.properties.encoded_len() } else { 0 }
                    + s.filters
                        .iter()
                        .map(|f| binary_len(f.filter.as_bytes()) + 1)
                        .sum::<usize>()
            }
            Self::SubAck(s) => {
                2 + if v5 { s.properties.encoded_len() } else { 0 } + s.reasons.len()
            }
            Self::Unsubscribe(u) => {
                2 + if v5 {
                    user_properties_len(&u.user_properties)
                } else {
                    0
                } + u
                    .filters
                    .iter()
                    .map(|f| binary_len(f.as_bytes()))
                    .sum::<usize>()
            }
            Self::UnsubAck(u) => {
                2 + if v5 {
                    u.properties.encoded_len() + u.reasons.len()
                } else {
                    0
                }
            }
            Self::PingReq | Self::PingResp => 0,
            Self::Disconnect(d) if v5 => short_reason_len(d.reason, &d.properties),
            Self::Disconnect(_) => 0,
            Self::Auth(a) => short_reason_len(a.reason, &a.properties),
        }
    }

    fn write_body(&self, version: ProtocolVersion, buf: &mut impl BufMut) {
        let v5 = version.is_v5();
        match self {
            Self::Connect(c) => write_connect(c, buf),
            Self::ConnAck(c) => {
                let flags = u8::from(c.session_present && version != ProtocolVersion::V3_1);
                buf.put_u8(flags);
                if v5 {
                    buf.put_u8(c.reason.as_u8());
                    c.properties.encode(buf);
                } else {
                    buf.put_u8(c.reason.v3_connect_return_code());
                }
            }
            Self::Publish(p) => {
                put_string(buf, p.topic.as_mqtt_str());
                if let Some(id) = p.packet_id {
                    buf.put_u16(id.get());
                }
                if v5 {
                    p.properties.encode(buf);
                }
                buf.put_slice(&p.payload);
            }
            Self::PubAck(r) | Self::PubRec(r) | Self::PubRel(r) | Self::PubComp(r) => {
                buf.put_u16(r.packet_id.get());
                if v5 {
                    write_short_reason(r.reason, &r.properties, buf);
                }
            }
            Self::Subscribe(s) => {
                buf.put_u16(s.packet_id.get());
                if v5 {
                    s.properties.encode(buf);
                }
                for sub in &s.filters {
                    put_string(buf, sub.filter.as_mqtt_str());
                    let o = &sub.options;
                    let mut byte = o.qos.bits();
                    if v5 {
                        byte |= u8::from(o.no_local) << 2
                            | u8::from(o.retain_as_published) << 3
                            | (o.retain_handling as u8) << 4;
                    }
                    buf.put_u8(byte);
                }
            }
            Self::SubAck(s) => {
                buf.put_u16(s.packet_id.get());
                if v5 {
                    s.properties.encode(buf);
                }
                for r in &s.reasons {
                    let code = match (v5, r.is_error()) {
                        (true, _) | (false, false) => r.as_u8(),
                        (false, true) => 0x80,
                    };
                    buf.put_u8(code);
                }
            }
            Self::Unsubscribe(u) => {
                buf.put_u16(u.packet_id.get());
                if v5 {
                    write_user_properties(&u.user_properties, buf);
                }
                for f in &u.filters {
                    put_string(buf, f.as_mqtt_str());
                }
            }
            Self::UnsubAck(u) => {
                buf.put_u16(u.packet_id.get());
                if v5 {
                    u.properties.encode(buf);
                    for r in &u.reasons {
                        buf.put_u8(r.as_u8());
                    }
                }
            }
            Self::PingReq | Self::PingResp => {}
            Self::Disconnect(d) => {
                if v5 {
                    write_short_reason(d.reason, &d.properties, buf);
                }
            }
            Self::Auth(a) => write_short_reason(a.reason, &a.properties, buf),
        }
    }
}

fn user_properties_body_len(users: &[UserProperty]) -> usize {
    users
        .iter()
        .map(|(k, v)| 1 + binary_len(k.as_bytes()) + binary_len(v.as_bytes()))
        .sum()
}

fn user_properties_len(users: &[UserProperty]) -> usize {
    let body = user_properties_body_len(users);
    varint_len(body as u32) + body
}

fn write_user_properties(users: &[UserProperty], buf: &mut impl BufMut) {
    put_varint(buf, user_properties_body_len(users) as u32);
    for (k, v) in users {
        buf.put_u8(id::USER_PROPERTY);
        put_string(buf, k);
        put_string(buf, v);
    }
}

/// Reason code and properties that may be left out: nothing for a plain success, no property
/// length when there are no properties [MQTT-3.4.2.1, MQTT-3.14.2.1, MQTT-3.15.2.1].
fn short_reason_len(reason: ReasonCode, props: &impl PropertySet) -> usize {
    let body = props.body_len();
    match (reason, body) {
        (ReasonCode::Success, 0) => 0,
        (_, 0) => 1,
        _ => 1 + varint_len(body as u32) + body,
    }
}

fn write_short_reason(reason: ReasonCode, props: &impl PropertySet, buf: &mut impl BufMut) {
    let body = props.body_len();
    match (reason, body) {
        (ReasonCode::Success, 0) => {}
        (_, 0) => buf.put_u8(reason.as_u8()),
        _ => {
            buf.put_u8(reason.as_u8());
            props.encode(buf);
        }
    }
}

fn connect_len(c: &Connect) -> usize {
    let v5 = c.protocol.is_v5();
    let mut len = binary_len(c.protocol.protocol_name().as_bytes()) + 1 + 1 + 2;
    if v5 {
        len += c.properties.encoded_len();
    }
    len += binary_len(c.client_id.as_mqtt_str().as_bytes());
    if let Some(w) = &c.will {
        if v5 {
            len += w.properties.encoded_len();
        }
        len += binary_len(w.topic.as_bytes()) + binary_len(&w.payload);
    }
    if let Some(u) = &c.username {
        len += binary_len(u.as_bytes());
    }
    if let Some(p) = &c.password {
        len += binary_len(p);
    }
    len
}

fn write_connect(c: &Connect, buf: &mut impl BufMut) {
    let v5 = c.protocol.is_v5();
    put_binary(buf, c.protocol.protocol_name().as_bytes());
    let bridge = if c.properties.bridge && !v5 {
        super::decode::BRIDGE_BIT
    } else {
        0
    };
    buf.put_u8(c.protocol.level() | bridge);
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos.bits() << 3) | (u8::from(w.retain) << 5);
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    buf.put_u8(flags);
    buf.put_u16(c.keep_alive);
    if v5 {
        c.properties.encode(buf);
    }
    put_string(buf, c.client_id.as_mqtt_str());
    if let Some(w) = &c.will {
        if v5 {
            w.properties.encode(buf);
        }
        put_string(buf, w.topic.as_mqtt_str());
        put_binary(buf, &w.payload);
    }
    if let Some(u) = &c.username {
        put_string(buf, u);
    }
    if let Some(p) = &c.password {
        put_binary(buf, p);
    }
}
