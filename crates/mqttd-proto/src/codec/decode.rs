//! Decoding packet bodies.

use bytes::Bytes;

use super::error::DecodeError;
use super::properties::{PropertySet, UserProperties};
use super::wire::{decode_varint, Reader};
use crate::packet::*;
use crate::reason::{ReasonCode, ReasonContext};
use crate::types::{ClientId, ProtocolVersion, QoS, TopicFilter, TopicName};

/// A parsed fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    /// The first byte: packet type and flags.
    pub first_byte: u8,
    /// Length of the packet after the fixed header.
    pub remaining_length: u32,
    /// Length of the fixed header itself (2 to 5 bytes).
    pub header_len: usize,
}

impl FixedHeader {
    /// Parses a fixed header from the start of `buf`. Returns `Ok(None)` if more bytes are
    /// needed. A packet larger than `max_packet_size` (header included) is refused here, before
    /// any of its body is buffered.
    pub fn parse(buf: &[u8], max_packet_size: u32) -> Result<Option<Self>, DecodeError> {
        let Some((&first_byte, rest)) = buf.split_first() else {
            return Ok(None);
        };
        if first_byte >> 4 == 0 {
            return Err(DecodeError::InvalidPacketType(0));
        }
        let Some((remaining_length, len)) = decode_varint(rest)? else {
            return Ok(None);
        };
        let header_len = 1 + len;
        let size = header_len as u64 + u64::from(remaining_length);
        if size > u64::from(max_packet_size) {
            return Err(DecodeError::PacketTooLarge {
                size,
                max: max_packet_size,
            });
        }
        Ok(Some(Self {
            first_byte,
            remaining_length,
            header_len,
        }))
    }

    /// The packet type, if the nibble names one.
    pub fn packet_type(&self) -> Option<PacketType> {
        PacketType::from_nibble(self.first_byte >> 4)
    }

    /// Total size of the packet including this header.
    pub fn packet_len(&self) -> usize {
        self.header_len + self.remaining_length as usize
    }
}

impl Packet {
    /// Decodes a packet body. `version` is the connection's negotiated version; CONNECT
    /// carries its own and ignores it.
    pub fn decode(
        header: FixedHeader,
        body: Bytes,
        version: ProtocolVersion,
    ) -> Result<Self, DecodeError> {
        let nibble = header.first_byte >> 4;
        let flags = header.first_byte & 0x0F;
        let packet =
            PacketType::from_nibble(nibble).ok_or(DecodeError::InvalidPacketType(nibble))?;
        let required_flags = match packet {
            PacketType::Publish => None,
            PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => Some(0x02),
            _ => Some(0x00),
        };
        if required_flags.is_some_and(|f| f != flags) {
            return Err(DecodeError::InvalidFlags { packet, flags });
        }
        let v5 = version.is_v5();
        let mut r = Reader::new(body);
        let decoded = match packet {
            PacketType::Connect => Self::Connect(Box::new(decode_connect(&mut r)?)),
            PacketType::ConnAck => Self::ConnAck(decode_connack(&mut r, version)?),
            PacketType::Publish => Self::Publish(decode_publish(&mut r, flags, v5)?),
            PacketType::PubAck => Self::PubAck(decode_pub_response(&mut r, v5, packet)?),
            PacketType::PubRec => Self::PubRec(decode_pub_response(&mut r, v5, packet)?),
            PacketType::PubRel => Self::PubRel(decode_pub_response(&mut r, v5, packet)?),
            PacketType::PubComp => Self::PubComp(decode_pub_response(&mut r, v5, packet)?),
            PacketType::Subscribe => Self::Subscribe(decode_subscribe(&mut r, v5)?),
            PacketType::SubAck => Self::SubAck(decode_suback(&mut r, v5)?),
            PacketType::Unsubscribe => Self::Unsubscribe(decode_unsubscribe(&mut r, v5)?),
            PacketType::UnsubAck => Self::UnsubAck(decode_unsuback(&mut r, v5)?),
            PacketType::PingReq => Self::PingReq,
            PacketType::PingResp => Self::PingResp,
            PacketType::Disconnect => Self::Disconnect(decode_disconnect(&mut r, v5)?),
            PacketType::Auth if v5 => Self::Auth(decode_auth(&mut r)?),
            PacketType::Auth => return Err(DecodeError::InvalidPacketType(nibble)),
        };
        r.finish()?;
        Ok(decoded)
    }
}

fn reason(code: u8, packet: PacketType, context: ReasonContext) -> Result<ReasonCode, DecodeError> {
    ReasonCode::from_u8(code)
        .filter(|r| r.valid_for(context))
        .ok_or(DecodeError::InvalidReasonCode { code, packet })
}

fn topic_name(r: &mut Reader, allow_empty: bool) -> Result<TopicName, DecodeError> {
    let s = r.string("topic name")?;
    let parsed = if allow_empty {
        TopicName::new_allow_empty(s)
    } else {
        TopicName::new(s)
    };
    parsed.map_err(|error| DecodeError::InvalidString {
        field: "topic name",
        error,
    })
}

fn topic_filter(r: &mut Reader) -> Result<TopicFilter, DecodeError> {
    let s = r.string("topic filter")?;
    TopicFilter::new(s).map_err(|error| DecodeError::InvalidString {
        field: "topic filter",
        error,
    })
}

fn decode_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.string("protocol name")?;
    let level = r.u8("protocol level")?;
    // Mosquitto's bridges set the level's high bit (`try_private`); MQTT 5 has no such level.
    let bridge = level & BRIDGE_BIT != 0;
    let version = match (name.as_str(), level & !BRIDGE_BIT) {
        ("MQTT", 4) => ProtocolVersion::V3_1_1,
        ("MQTT", 5) if !bridge => ProtocolVersion::V5,
        ("MQIsdp", 3) => ProtocolVersion::V3_1,
        ("MQTT" | "MQIsdp", _) => return Err(DecodeError::UnsupportedProtocolLevel(level)),
        _ => return Err(DecodeError::InvalidProtocolName),
    };
    decode_connect_rest(r, version, bridge).map_err(|error| DecodeError::InConnect {
        version,
        error: Box::new(error),
    })
}

/// The bit of the protocol level that marks a Mosquitto bridge (see [`Connect::bridge`]).
pub(crate) const BRIDGE_BIT: u8 = 0x80;

fn decode_connect_rest(
    r: &mut Reader,
    protocol: ProtocolVersion,
    bridge: bool,
) -> Result<Connect, DecodeError> {
    let flags = r.u8("connect flags")?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::ReservedFlag("CONNECT flags"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = QoS::from_bits((flags >> 3) & 0x03).ok_or(DecodeError::InvalidQoS("will"))?;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(DecodeError::WillFlagsWithoutWill);
    }
    if has_password && !has_username && !protocol.is_v5() {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let keep_alive = r.u16("keep alive")?;
    let properties = if protocol.is_v5() {
        ConnectProperties::decode(r)?
    } else {
        ConnectProperties {
            bridge,
            ..ConnectProperties::default()
        }
    };
    let client_id = r.string("client identifier").and_then(|s| {
        ClientId::new(s).map_err(|error| DecodeError::InvalidString {
            field: "client identifier",
            error,
        })
    })?;
    let will = if will_flag {
        let properties = if protocol.is_v5() {
            WillProperties::decode(r)?
        } else {
            WillProperties::default()
        };
        let topic = topic_name(r, false)?;
        let payload = r.binary("will payload")?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string("user name")?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary("password")?)
    } else {
        None
    };
    // Checked here so that the error carries the version and is answered with a CONNACK.
    if !r.is_empty() {
        return Err(DecodeError::TrailingBytes(r.remaining()));
    }
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn decode_connack(r: &mut Reader, version: ProtocolVersion) -> Result<ConnAck, DecodeError> {
    let flags = r.u8("acknowledge flags")?;
    if flags & 0xFE != 0 && version != ProtocolVersion::V3_1 {
        return Err(DecodeError::ReservedFlag("CONNACK flags"));
    }
    let session_present = version != ProtocolVersion::V3_1 && flags & 0x01 != 0;
    let code = r.u8("reason code")?;
    let (reason, properties) = if version.is_v5() {
        let reason = reason(code, PacketType::ConnAck, ReasonContext::ConnAck)?;
        (reason, ConnAckProperties::decode(r)?)
    } else {
        let reason = ReasonCode::from_v3_connect_return_code(code).ok_or(
            DecodeError::InvalidReasonCode {
                code,
                packet: PacketType::ConnAck,
            },
        )?;
        (reason, ConnAckProperties::default())
    };
    Ok(ConnAck {
        session_present,
        reason,
        properties,
    })
}

fn decode_publish(r: &mut Reader, flags: u8, v5: bool) -> Result<Publish, DecodeError> {
    let dup = flags & 0x08 != 0;
    let qos = QoS::from_bits((flags >> 1) & 0x03).ok_or(DecodeError::InvalidQoS("PUBLISH"))?;
    let retain = flags & 0x01 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::DupOnQoS0);
    }
    let topic = topic_name(r, v5)?;
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(r.packet_id()?)
    };
    let properties = if v5 {
        PublishProperties::decode(r)?
    } else {
        PublishProperties::default()
    };
    if topic.is_empty() && properties.topic_alias.is_none() {
        return Err(DecodeError::MissingTopic);
    }
    let payload = r.rest();
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        properties,
        payload,
    })
}

fn decode_pub_response(
    r: &mut Reader,
    v5: bool,
    packet: PacketType,
) -> Result<PubResponse, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut response = PubResponse::success(packet_id);
    if v5 && !r.is_empty() {
        let context = match packet {
            PacketType::PubAck | PacketType::PubRec => ReasonContext::PubAckRec,
            _ => ReasonContext::PubRelComp,
        };
        response.reason = reason(r.u8("reason code")?, packet, context)?;
        if !r.is_empty() {
            response.properties = AckProperties::decode(r)?;
        }
    }
    Ok(response)
}

fn decode_subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = if v5 {
        SubscribeProperties::decode(r)?
    } else {
        SubscribeProperties::default()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = topic_filter(r)?;
        let options = r.u8("subscription options")?;
        let reserved = if v5 { 0xC0 } else { 0xFC };
        if options & reserved != 0 {
            return Err(DecodeError::ReservedFlag("subscription options"));
        }
        let qos = QoS::from_bits(options & 0x03).ok_or(DecodeError::InvalidQoS("SUBSCRIBE"))?;
        let retain_handling = match (options >> 4) & 0x03 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(DecodeError::InvalidRetainHandling),
        };
        let options = SubscriptionOptions {
            qos,
            no_local: options & 0x04 != 0,
            retain_as_published: options & 0x08 != 0,
            retain_handling,
        };
        filters.push(Subscription { filter, options });
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters(PacketType::Subscribe));
    }
    Ok(Subscribe {
        packet_id,
        properties,
        filters,
    })
}

fn decode_suback(r: &mut Reader, v5: bool) -> Result<SubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = if v5 {
        AckProperties::decode(r)?
    } else {
        AckProperties::default()
    };
    let mut reasons = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        let code = r.u8("reason code")?;
        let parsed = if v5 {
            reason(code, PacketType::SubAck, ReasonContext::SubAck)?
        } else {
            match code {
                0x00 => ReasonCode::Success,
                0x01 => ReasonCode::GrantedQoS1,
                0x02 => ReasonCode::GrantedQoS2,
                0x80 => ReasonCode::UnspecifiedError,
                _ => {
                    return Err(DecodeError::InvalidReasonCode {
                        code,
                        packet: PacketType::SubAck,
                    })
                }
            }
        };
        reasons.push(parsed);
    }
    Ok(SubAck {
        packet_id,
        properties,
        reasons,
    })
}

fn decode_unsubscribe(r: &mut Reader, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let user_properties = if v5 {
        UserProperties::decode(r)?.0
    } else {
        Vec::new()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(topic_filter(r)?);
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters(PacketType::Unsubscribe));
    }
    Ok(Unsubscribe {
        packet_id,
        user_properties,
        filters,
    })
}

fn decode_unsuback(r: &mut Reader, v5: bool) -> Result<UnsubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut ack = UnsubAck {
        packet_id,
        properties: AckProperties::default(),
        reasons: Vec::new(),
    };
    if v5 {
        ack.properties = AckProperties::decode(r)?;
        while !r.is_empty() {
            let code = r.u8("reason code")?;
            ack.reasons
                .push(reason(code, PacketType::UnsubAck, ReasonContext::UnsubAck)?);
        }
    }
    Ok(ack)
}

fn decode_disconnect(r: &mut Reader, v5: bool) -> Result<Disconnect, DecodeError> {
    let mut disconnect = Disconnect::new(ReasonCode::Success);
    if v5 && !r.is_empty() {
        let code = r.u8("reason code")?;
        disconnect.reason = reason(code, PacketType::Disconnect, ReasonContext::Disconnect)?;
        if !r.is_empty() {
            disconnect.properties = DisconnectProperties::decode(r)?;
        }
    }
    Ok(disconnect)
}

fn decode_auth(r: &mut Reader) -> Result<Auth, DecodeError> {
    let mut auth = Auth {
        reason: ReasonCode::Success,
        properties: AuthProperties::default(),
    };
    if !r.is_empty() {
        auth.reason = reason(r.u8("reason code")?, PacketType::Auth, ReasonContext::Auth)?;
        if !r.is_empty() {
            auth.properties = AuthProperties::decode(r)?;
        }
    }
    Ok(auth)
}
