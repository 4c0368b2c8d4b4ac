//! MQTT 5 properties: one generic reader and writer, and per-packet property sets that say
//! which identifiers they accept.

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{BufMut, Bytes};

use super::error::DecodeError;
use super::wire::{binary_len, put_binary, put_string, put_varint, varint_len, Reader};
use crate::packet::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PacketType, PublishProperties, SubscribeProperties, UserProperty, WillProperties,
    MAX_SUBSCRIPTION_ID,
};
use crate::types::{ClientId, MqttStr, QoS, TopicName};

/// Property identifiers (MQTT 5.0 section 2.2.2.2).
#[allow(missing_docs)]
pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// A decoded property value; its kind is fixed by the identifier.
pub(crate) enum Value {
    Byte(u8),
    U16(u16),
    U32(u32),
    VarInt(u32),
    Str(MqttStr),
    Bin(Bytes),
    Pair(MqttStr, MqttStr),
}

/// A property value borrowed for encoding.
pub(crate) enum ValueRef<'a> {
    Byte(u8),
    U16(u16),
    U32(u32),
    VarInt(u32),
    Str(&'a MqttStr),
    Bin(&'a [u8]),
    Pair(&'a MqttStr, &'a MqttStr),
}

impl ValueRef<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Byte(_) => 1,
            Self::U16(_) => 2,
            Self::U32(_) => 4,
            Self::VarInt(v) => varint_len(*v),
            Self::Str(s) => binary_len(s.as_bytes()),
            Self::Bin(b) => binary_len(b),
            Self::Pair(k, v) => binary_len(k.as_bytes()) + binary_len(v.as_bytes()),
        }
    }

    fn put(&self, buf: &mut impl BufMut) {
        match self {
            Self::Byte(v) => buf.put_u8(*v),
            Self::U16(v) => buf.put_u16(*v),
            Self::U32(v) => buf.put_u32(*v),
            Self::VarInt(v) => put_varint(buf, *v),
            Self::Str(s) => put_string(buf, s),
            Self::Bin(b) => put_binary(buf, b),
            Self::Pair(k, v) => {
                put_string(buf, k);
                put_string(buf, v);
            }
        }
    }
}

fn read_value(r: &mut Reader, property: u8) -> Result<Value, DecodeError> {
    use id::*;
    const F: &str = "property";
    Ok(match property {
        PAYLOAD_FORMAT_INDICATOR
        | REQUEST_PROBLEM_INFORMATION
        | REQUEST_RESPONSE_INFORMATION
        | MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_SUBSCRIPTION_AVAILABLE
        | SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | SHARED_SUBSCRIPTION_AVAILABLE => Value::Byte(r.u8(F)?),
        SERVER_KEEP_ALIVE | RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | TOPIC_ALIAS => {
            Value::U16(r.u16(F)?)
        }
        MESSAGE_EXPIRY_INTERVAL
        | SESSION_EXPIRY_INTERVAL
        | WILL_DELAY_INTERVAL
        | MAXIMUM_PACKET_SIZE => Value::U32(r.u32(F)?),
        SUBSCRIPTION_IDENTIFIER => Value::VarInt(r.varint(F)?),
        CONTENT_TYPE
        | RESPONSE_TOPIC
        | ASSIGNED_CLIENT_IDENTIFIER
        | AUTHENTICATION_METHOD
        | RESPONSE_INFORMATION
        | SERVER_REFERENCE
        | REASON_STRING => Value::Str(r.string(F)?),
        CORRELATION_DATA | AUTHENTICATION_DATA => Value::Bin(r.binary(F)?),
        USER_PROPERTY => Value::Pair(r.string("user property")?, r.string("user property")?),
        other => return Err(DecodeError::UnknownProperty(other)),
    })
}

/// A set of properties belonging to one packet type.
pub(crate) trait PropertySet: Default {
    /// The packet, for error messages.
    const PACKET: PacketType;

    /// Stores one decoded property, refusing identifiers this packet does not allow.
    fn accept(&mut self, property: u8, value: Value) -> Result<(), DecodeError>;

    /// Visits every property to encode, in identifier order.
    fn visit(&self, f: &mut dyn FnMut(u8, ValueRef<'_>));

    /// Reads the property length and the properties that follow it.
    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let len = r.varint("property length")?;
        let mut props = r.sub(len as usize)?;
        let mut set = Self::default();
        while !props.is_empty() {
            let property = props.varint("property identifier")?;
            let property =
                u8::try_from(property).map_err(|_| DecodeError::UnknownProperty(0xFF))?;
            let value = read_value(&mut props, property)?;
            set.accept(property, value)?;
        }
        Ok(set)
    }

    /// Length of the properties without the length prefix.
    fn body_len(&self) -> usize {
        let mut len = 0;
        self.visit(&mut |_, v| len += 1 + v.len());
        len
    }

    /// Length of the properties including the length prefix.
    fn encoded_len(&self) -> usize {
        let body = self.body_len();
        varint_len(body as u32) + body
    }

    /// Writes the length prefix and the properties.
    fn encode(&self, buf: &mut impl BufMut) {
        put_varint(buf, self.body_len() as u32);
        self.visit(&mut |property, v| {
            buf.put_u8(property);
            v.put(buf);
        });
    }
}

fn once<T>(slot: &mut Option<T>, value: T, property: u8) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty(property));
    }
    *slot = Some(value);
    Ok(())
}

fn flag(v: u8, property: u8) -> Result<bool, DecodeError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::InvalidPropertyValue(property)),
    }
}

fn nonzero16(v: u16, property: u8) -> Result<NonZeroU16, DecodeError> {
    NonZeroU16::new(v).ok_or(DecodeError::InvalidPropertyValue(property))
}

fn nonzero32(v: u32, property: u8) -> Result<NonZeroU32, DecodeError> {
    NonZeroU32::new(v).ok_or(DecodeError::InvalidPropertyValue(property))
}

fn subscription_id(v: u32, property: u8) -> Result<NonZeroU32, DecodeError> {
    if v > MAX_SUBSCRIPTION_ID {
        return Err(DecodeError::InvalidPropertyValue(property));
    }
    nonzero32(v, property)
}

fn topic(s: MqttStr) -> Result<TopicName, DecodeError> {
    TopicName::new(s).map_err(|error| DecodeError::InvalidString {
        field: "response topic",
        error,
    })
}

/// Decodes `value` as the kind the identifier promises; `read_value` guarantees the match, so
/// a mismatch can only mean a bug and is reported as an invalid value rather than a panic.
macro_rules! expect {
    ($value:expr, $kind:ident, $property:expr) => {
        match $value {
            Value::$kind(v) => v,
            _ => return Err(DecodeError::InvalidPropertyValue($property)),
        }
    };
}

fn visit_users(users: &[UserProperty], f: &mut dyn FnMut(u8, ValueRef<'_>)) {
    for (k, v) in users {
        f(id::USER_PROPERTY, ValueRef::Pair(k, v));
    }
}

fn user(value: Value, users: &mut Vec<UserProperty>) -> Result<(), DecodeError> {
    let Value::Pair(k, v) = value else {
        return Err(DecodeError::InvalidPropertyValue(id::USER_PROPERTY));
    };
    users.push((k, v));
    Ok(())
}

impl PropertySet for ConnectProperties {
    const PACKET: PacketType = PacketType::Connect;

    fn accept(&mut self, p: u8, value: Value) -> Result<(), DecodeError> {
        use id::*;
        match p {
            SESSION_EXPIRY_INTERVAL => {
                once(&mut self.session_expiry_interval, expect!(value, U32, p), p)
            }
            RECEIVE_MAXIMUM => once(
                &mut self.receive_maximum,
                nonzero16(expect!(value, U16, p), p)?,
                p,
            ),
            MAXIMUM_PACKET_SIZE => once(
                &mut self.maximum_packet_size,
                nonzero32(expect!(value, U32, p), p)?,
                p,
            ),
            TOPIC_ALIAS_MAXIMUM => once(&mut self.topic_alias_maximum, expect!(value, U16, p), p),
            REQUEST_RESPONSE_INFORMATION => once(
                &mut self.request_response_information,
                flag(expect!(value, Byte, p), p)?,
                p,
            ),
            REQUEST_PROBLEM_INFORMATION => once(
                &mut self.request_problem_information,
                flag(expect!(value, Byte, p), p)?,
                p,
            ),
            USER_PROPERTY => user(value, &mut self.user_properties),
            AUTHENTICATION_METHOD => {
                once(&mut self.authentication_method, expect!(value, Str, p), p)
            }
            AUTHENTICATION_DATA => once(&mut self.authentication_data, expect!(value, Bin, p), p),
            _ => Err(DecodeError::PropertyNotAllowed {
                id: p,
                packet: Self::PACKET,
            }),
        }
    }

    fn visit(&self, f: &mut dyn FnMut(u8, ValueRef<'_>)) {
        use id::*;
        if let Some(v) = self.session_expiry_interval {
            f(SESSION_EXPIRY_INTERVAL, ValueRef::U32(v));
        }
        if let Some(v) = &self.authentication_method {
            f(AUTHENTICATION_METHOD, ValueRef::Str(v));
        }
        if let Some(v) = &self.authentication_data {
            f(AUTHENTICATION_DATA, ValueRef::Bin(v));
        }
        if let Some(v) = self.request_problem_information {
            f(REQUEST_PROBLEM_INFORMATION, ValueRef::Byte(v.into()));
        }
        if let Some(v) = self.request_response_information {
            f(REQUEST_RESPONSE_INFORMATION, ValueRef::Byte(v.into()));
        }
        if let Some(v) = self.receive_maximum {
            f(RECEIVE_MAXIMUM, ValueRef::U16(v.get()));
        }
        if let Some(v) = self.topic_alias_maximum {
            f(TOPIC_ALIAS_MAXIMUM, ValueRef::U16(v));
        }
        visit_users(&self.user_properties, f);
        if let Some(v) = self.maximum_packet_size {
            f(MAXIMUM_PACKET_SIZE, ValueRef::U32(v.get()));
        }
    }
}

impl PropertySet for WillProperties {
    const PACKET: PacketType = PacketType::Connect;

    fn accept(&mut self, p: u8, value: Value) -> Result<(), DecodeError> {
        use id::*;
        match p {
            WILL_DELAY_INTERVAL => once(&mut self.will_delay_interval, expect!(value, U32, p), p),
            PAYLOAD_FORMAT_INDICATOR => once(
                &mut self.payload_format_indicator,
                flag(expect!(value, Byte, p), p)?,
                p,
            ),
            MESSAGE_EXPIRY_INTERVAL => {
                once(&mut self.message_expiry_interval, expect!(value, U32, p), p)
            }
            CONTENT_TYPE => once(&mut self.content_type, expect!(value, Str, p), p),
            RESPONSE_TOPIC => once(&mut self.response_topic, topic(expect!(value, Str, p))?, p),
            CORRELATION_DATA => once(&mut self.correlation_data, expect!(value, Bin, p), p),
            USER_PROPERTY => user(value, &mut self.user_properties),
            _ => Err(DecodeError::PropertyNotAllowed {
                id: p,
                packet: Self::PACKET,
            }),
        }
    }

    fn visit(&self, f: &mut dyn FnMut(u8, ValueRef<'_>)) {
        use id::*;
        if let Some(v) = self.payload_format_indicator {
            f(PAYLOAD_FORMAT_INDICATOR, ValueRef::Byte(v.into()));
        }
        if let Some(v) = self.message_expiry_interval {
            f(MESSAGE_EXPIRY_INTERVAL, ValueRef::U32(v));
        }
        if let Some(v) = &self.content_type {
            f(CONTENT_TYPE, ValueRef::Str(v));
        }
        if let Some(v) = &self.response_topic {
            f(RESPONSE_TOPIC, ValueRef::Str(v.as_mqtt_str()));
        }
        if let Some(v) = &self.correlation_data {
            f(CORRELATION_DATA, ValueRef::Bin(v));
        }
        if let Some(v) = self.will_delay_interval {
            f(WILL_DELAY_INTERVAL, ValueRef::U32(v));
        }
        visit_users(&self.user_properties, f);
    }
}

impl PropertySet for ConnAckProperties {
    const PACKET: PacketType = PacketType::ConnAck;

    fn accept(&mut self, p: u8, value: Value) -> Result<(), DecodeError> {
        use id::*;
        match p {
            SESSION_EXPIRY_INTERVAL => {
                once(&mut self.session_expiry_interval, expect!(value, U32, p), p)
            }
            RECEIVE_MAXIMUM => once(
                &mut self.receive_maximum,
                nonzero16(expect!(value, U16, p), p)?,
                p,
            ),
            MAXIMUM_QOS => {
                let qos = match expect!(value, Byte, p) {
                    0 => QoS::AtMostOnce,
                    1 => QoS::AtLeastOnce,
                    _ => return Err(DecodeError::InvalidPropertyValue(p)),
                };
                once(&mut self.maximum_qos, qos, p)
            }
            RETAIN_AVAILABLE => once(
                &mut self.retain_available,
                flag(expect!(value, Byte, p), p)?,
                p,
            ),
            MAXIMUM_PACKET_SIZE => once(
                &mut self.maximum_packet_size,
                nonzero32(expect!(value, U32, p), p)?,
                p,
            ),
            ASSIGNED_CLIENT_IDENTIFIER => {
                let s = expect!(value, Str, p);
                let client_id = ClientId::new(s).map_err(|error| DecodeError::InvalidString {
                    field: "assigned client identifier",
                    error,
                })?;
                once(&mut self.assigned_client_identifier, client_id, p)
            }
            TOPIC_ALIAS_MAXIMUM => once(&mut self.topic_alias_maximum, expect!(value, U16, p), p),
            REASON_STRING => once(&mut self.reason_string, expect!(value, Str, p), p),
            USER_PROPERTY => user(value, &mut self.user_properties),
            WILDCARD_SUBSCRIPTION_AVAILABLE => once(
                &mut self.wildcard_subscription_available,
                flag(expect!(value, Byte, p), p)?,
                p,
            ),
            SUBSCRIPTION_IDENTIFIER_AVAILABLE => once(
                &mut self.subscription_identifiers_available,
                flag(expect!(value, Byte, p), p)?,
                p,
            ),
            SHARED_SUBSCRIPTION_AVAILABLE => once(
                &mut self.shared_subscription_available,
                flag(expect!(value, Byte, p), p)?,
                p,
            ),
            SERVER_KEEP_ALIVE => once(&mut self.server_keep_alive, expect!(value, U16, p), p),
            RESPONSE_INFORMATION => once(&mut self.response_information, expect!(value, Str, p), p),
            SERVER_REFERENCE => once(&mut self.server_reference, expect!(value, Str, p), p),
            AUTHENTICATION_METHOD => {
                once(&mut self.authentication_method, expect!(value, Str, p), p)
            }
            AUTHENTICATION_DATA => once(&mut self.authentication_data, expect!(value, Bin, p), p),
            _ => Err(DecodeError::PropertyNotAllowed {
                id: p,
                packet: Self::PACKET,
            }),
        }
    }

    fn visit(&self, f: &mut dyn FnMut(u8, ValueRef<'_>)) {
        use id::*;
        if let Some(v) = self.session_expiry_interval {
            f(SESSION_EXPIRY_INTERVAL, ValueRef::U32(v));
        }
        if let Some(v) = &self.assigned_client_identifier {
            f(ASSIGNED_CLIENT_IDENTIFIER, ValueRef::Str(v.as_mqtt_str()));
        }
        if let Some(v) = self.server_keep_alive {
            f(SERVER_KEEP_ALIVE, ValueRef::U16(v));
        }
        if let Some(v) = &self.authentication_method {
            f(AUTHENTICATION_METHOD, ValueRef::Str(v));
        }
        if let Some(v) = &self.authentication_data {
            f(AUTHENTICATION_DATA, ValueRef::Bin(v));
        }
        if let Some(v) = &self.response_information {
            f(RESPONSE_INFORMATION, ValueRef::Str(v));
        }
        if let Some(v) = &self.server_reference {
            f(SERVER_REFERENCE, ValueRef::Str(v));
        }
        if let Some(v) = &self.reason_string {
            f(REASON_STRING, ValueRef::Str(v));
        }
        if let Some(v) = self.receive_maximum {
            f(RECEIVE_MAXIMUM, ValueRef::U16(v.get()));
        }
        if let Some(v) = self.topic_alias_maximum {
            f(TOPIC_ALIAS_MAXIMUM, ValueRef::U16(v));
        }
        if let Some(v) = self.maximum_qos {
            f(MAXIMUM_QOS, ValueRef::Byte(v.bits()));
        }
        if let Some(v) = self.retain_available {
            f(RETAIN_AVAILABLE, ValueRef::Byte(v.into()));
        }
        visit_users(&self.user_properties, f);
        if let Some(v) = self.maximum_packet_size {
            f(MAXIMUM_PACKET_SIZE, ValueRef::U32(v.get()));
        }
        if let Some(v) = self.wildcard_subscription_available {
            f(WILDCARD_SUBSCRIPTION_AVAILABLE, ValueRef::Byte(v.into()));
        }
        if let Some(v) = self.subscription_identifiers_available {
            f(SUBSCRIPTION_IDENTIFIER_AVAILABLE, ValueRef::Byte(v.into()));
        }
        if let Some(v) = self.shared_subscription_available {
            f(SHARED_SUBSCRIPTION_AVAILABLE, ValueRef::Byte(v.into()));
        }
    }
}

impl PropertySet for PublishProperties {
    const PACKET: PacketType = PacketType::Publish;

    fn accept(&mut self, p: u8, value: Value) -> Result<(), DecodeError> {
        use id::*;
        match p {
            PAYLOAD_FORMAT_INDICATOR => once(
                &mut self.payload_format_indicator,
                flag(expect!(value, Byte, p), p)?,
                p,
            ),
            MESSAGE_EXPIRY_INTERVAL => {
                once(&mut self.message_expiry_interval, expect!(value, U32, p), p)
            }
            TOPIC_ALIAS => once(
                &mut self.topic_alias,
                nonzero16(expect!(value, U16, p), p)?,
                p,
            ),
            RESPONSE_TOPIC => once(&mut self.response_topic, topic(expect!(value, Str, p))?, p),
            CORRELATION_DATA => once(&mut self.correlation_data, expect!(value, Bin, p), p),
            USER_PROPERTY => user(value, &mut self.user_properties),
            SUBSCRIPTION_IDENTIFIER => {
                let v = subscription_id(expect!(value, VarInt, p), p)?;
                self.subscription_identifiers.push(v);
                Ok(())
            }
            CONTENT_TYPE => once(&mut self.content_type, expect!(value, Str, p), p),
            _ => Err(DecodeError::PropertyNotAllowed {
                id: p,
                packet: Self::PACKET,
            }),
        }
    }

    fn visit(&self, f: &mut dyn FnMut(u8, ValueRef<'_>)) {
        use id::*;
        if let Some(v) = self.payload_format_indicator {
            f(PAYLOAD_FORMAT_INDICATOR, ValueRef::Byte(v.into()));
        }
        if let Some(v) = self.message_expiry_interval {
            f(MESSAGE_EXPIRY_INTERVAL, ValueRef::U32(v));
        }
        if let Some(v) = &self.content_type {
            f(CONTENT_TYPE, ValueRef::Str(v));
        }
        if let Some(v) = &self.response_topic {
            f(RESPONSE_TOPIC, ValueRef::Str(v.as_mqtt_str()));
        }
        if let Some(v) = &self.correlation_data {
            f(CORRELATION_DATA, ValueRef::Bin(v));
        }
        for v in &self.subscription_identifiers {
            f(SUBSCRIPTION_IDENTIFIER, ValueRef::VarInt(v.get()));
        }
        if let Some(v) = self.topic_alias {
            f(TOPIC_ALIAS, ValueRef::U16(v.get()));
        }
        visit_users(&self.user_properties, f);
    }
}

/// Reason string and user properties, shared by PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and
/// UNSUBACK; the packet type only matters for error messages.
impl PropertySet for AckProperties {
    const PACKET: PacketType = PacketType::PubAck;

    fn accept(&mut self, p: u8, value: Value) -> Result<(), DecodeError> {
        match p {
            id::REASON_STRING => once(&mut self.reason_string, expect!(value, Str, p), p),
            id::USER_PROPERTY => user(value, &mut self.user_properties),
            _ => Err(DecodeError::PropertyNotAllowed {
                id: p,
                packet: Self::PACKET,
            }),
        }
    }

    fn visit(&self, f: &mut dyn FnMut(u8, ValueRef<'_>)) {
        if let Some(v) = &self.reason_string {
            f(id::REASON_STRING, ValueRef::Str(v));
        }
        visit_users(&self.user_properties, f);
    }
}

impl PropertySet for SubscribeProperties {
    const PACKET: PacketType = PacketType::Subscribe;

    fn accept(&mut self, p: u8, value: Value) -> Result<(), DecodeError> {
        match p {
            id::SUBSCRIPTION_IDENTIFIER => once(
                &mut self.subscription_identifier,
                subscription_id(expect!(value, VarInt, p), p)?,
                p,
            ),
            id::USER_PROPERTY => user(value, &mut self.user_properties),
            _ => Err(DecodeError::PropertyNotAllowed {
                id: p,
                packet: Self::PACKET,
            }),
        }
    }

    fn visit(&self, f: &mut dyn FnMut(u8, ValueRef<'_>)) {
        if let Some(v) = self.subscription_identifier {
            f(id::SUBSCRIPTION_IDENTIFIER, ValueRef::VarInt(v.get()));
        }
        visit_users(&self.user_properties, f);
    }
}

/// UNSUBSCRIBE carries only user properties.
#[derive(Default)]
pub(crate) struct UserProperties(pub(crate) Vec<UserProperty>);

impl PropertySet for UserProperties {
    const PACKET: PacketType = PacketType::Unsubscribe;

    fn accept(&mut self, p: u8, value: Value) -> Result<(), DecodeError> {
        match p {
            id::USER_PROPERTY => user(value, &mut self.0),
            _ => Err(DecodeError::PropertyNotAllowed {
                id: p,
                packet: Self::PACKET,
            }),
        }
    }

    fn visit(&self, f: &mut dyn FnMut(u8, ValueRef<'_>)) {
        visit_users(&self.0, f);
    }
}

impl PropertySet for DisconnectProperties {
    const PACKET: PacketType = PacketType::Disconnect;

    fn accept(&mut self, p: u8, value: Value) -> Result<(), DecodeError> {
        use id::*;
        match p {
            SESSION_EXPIRY_INTERVAL => {
                once(&mut self.session_expiry_interval, expect!(value, U32, p), p)
            }
            REASON_STRING => once(&mut self.reason_string, expect!(value, Str, p), p),
            USER_PROPERTY => user(value, &mut self.user_properties),
            SERVER_REFERENCE => once(&mut self.server_reference, expect!(value, Str, p), p),
            _ => Err(DecodeError::PropertyNotAllowed {
                id: p,
                packet: Self::PACKET,
            }),
        }
    }

    fn visit(&self, f: &mut dyn FnMut(u8, ValueRef<'_>)) {
        use id::*;
        if let Some(v) = self.session_expiry_interval {
            f(SESSION_EXPIRY_INTERVAL, ValueRef::U32(v));
        }
        if let Some(v) = &self.server_reference {
            f(SERVER_REFERENCE, ValueRef::Str(v));
        }
        if let Some(v) = &self.reason_string {
            f(REASON_STRING, ValueRef::Str(v));
        }
        visit_users(&self.user_properties, f);
    }
}

impl PropertySet for AuthProperties {
    const PACKET: PacketType = PacketType::Auth;

    fn accept(&mut self, p: u8, value: Value) -> Result<(), DecodeError> {
        use id::*;
        match p {
            AUTHENTICATION_METHOD => {
                once(&mut self.authentication_method, expect!(value, Str, p), p)
            }
            AUTHENTICATION_DATA => once(&mut self.authentication_data, expect!(value, Bin, p), p),
            REASON_STRING => once(&mut self.reason_string, expect!(value, Str, p), p),
            USER_PROPERTY => user(value, &mut self.user_properties),
            _ => Err(DecodeError::PropertyNotAllowed {
                id: p,
                packet: Self::PACKET,
            }),
        }
    }

    fn visit(&self, f: &mut dyn FnMut(u8, ValueRef<'_>)) {
        use id::*;
        if let Some(v) = &self.authentication_method {
            f(AUTHENTICATION_METHOD, ValueRef::Str(v));
        }
        if let Some(v) = &self.authentication_data {
            f(AUTHENTICATION_DATA, ValueRef::Bin(v));
        }
        if let Some(v) = &self.reason_string {
            f(REASON_STRING, ValueRef::Str(v));
        }
        visit_users(&self.user_properties, f);
    }
}
