//! Why a packet could not be decoded, and the reason code that answers it.

use crate::packet::PacketType;
use crate::reason::ReasonCode;
use crate::types::{ProtocolVersion, StringError};

/// A decoding failure. Each variant names the rule that was broken; [`DecodeError::reason_code`]
/// gives the code to put in CONNACK or DISCONNECT before closing the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The packet type nibble is 0, or AUTH arrived on an MQTT 3 connection [MQTT-2.1.2].
    #[error("invalid packet type {0}")]
    InvalidPacketType(u8),
    /// The fixed header flags are not those required for the packet type [MQTT-2.1.3-1].
    #[error("invalid fixed header flags 0x{flags:X} for {packet:?}")]
    InvalidFlags {
        /// The packet type.
        packet: PacketType,
        /// The low nibble received.
        flags: u8,
    },
    /// A variable byte integer used more than four bytes, or more than it needed
    /// [MQTT-1.5.5-1].
    #[error("variable byte integer longer than four bytes or not in its shortest form")]
    MalformedVariableInteger,
    /// The packet is larger than the receiver's maximum packet size [MQTT-3.2.2-15].
    #[error("packet of {size} bytes exceeds the maximum packet size {max}")]
    PacketTooLarge {
        /// Size the fixed header declared, header included.
        size: u64,
        /// The limit in force.
        max: u32,
    },
    /// The packet ended before a field it must contain [MQTT-1.5, MQTT-2.1.4].
    #[error("packet ended before its {0} field")]
    UnexpectedEnd(&'static str),
    /// Bytes remained after the last field of the packet.
    #[error("{0} bytes left over after the end of the packet")]
    TrailingBytes(usize),
    /// A string field is not a valid MQTT string, topic name or filter.
    #[error("invalid {field}: {error}")]
    InvalidString {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        error: StringError,
    },
    /// The CONNECT protocol name is not `MQTT` or `MQIsdp` [MQTT-3.1.2-1].
    #[error("unknown protocol name")]
    InvalidProtocolName,
    /// The CONNECT protocol level is not 3, 4 or 5 [MQTT-3.1.2-2].
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    /// A reserved flag in CONNECT, SUBSCRIBE options or CONNACK is set [MQTT-3.1.2-3].
    #[error("reserved flag set in {0}")]
    ReservedFlag(&'static str),
    /// QoS value 3 [MQTT-3.3.1-4].
    #[error("invalid QoS 3 in {0}")]
    InvalidQoS(&'static str),
    /// Will QoS or retain set without the will flag [MQTT-3.1.2-11, MQTT-3.1.2-13].
    #[error("will QoS or retain set without a will")]
    WillFlagsWithoutWill,
    /// A 3.1.1 CONNECT has a password but no user name [MQTT-3.1.2-22].
    #[error("password without a user name")]
    PasswordWithoutUsername,
    /// A QoS 0 PUBLISH has the DUP flag set [MQTT-3.3.1-2].
    #[error("DUP set on a QoS 0 PUBLISH")]
    DupOnQoS0,
    /// A packet identifier is zero [MQTT-2.2.1-3].
    #[error("packet identifier 0")]
    ZeroPacketId,
    /// A PUBLISH has neither a topic name nor a topic alias [MQTT-3.3.2-8].
    #[error("PUBLISH without topic name or topic alias")]
    MissingTopic,
    /// SUBSCRIBE or UNSUBSCRIBE without any topic filter [MQTT-3.8.3-2, MQTT-3.10.3-2].
    #[error("{0:?} without topic filters")]
    NoTopicFilters(PacketType),
    /// Retain handling 3, which MQTT 5.0 section 3.8.3.1 makes a protocol error (unlike the
    /// reserved bits of the options byte, whose rule [MQTT-3.8.3-5] makes the packet malformed).
    #[error("invalid retain handling 3")]
    InvalidRetainHandling,
    /// A property identifier that does not exist [MQTT-2.2.2].
    #[error("unknown property identifier 0x{0:02X}")]
    UnknownProperty(u8),
    /// A property that is not allowed in this packet [MQTT-2.2.2-2].
    #[error("property 0x{id:02X} is not allowed in {packet:?}")]
    PropertyNotAllowed {
        /// The property identifier.
        id: u8,
        /// The packet type.
        packet: PacketType,
    },
    /// A property that may appear once appeared twice [MQTT-2.2.2-1].
    #[error("property 0x{0:02X} appears more than once")]
    DuplicateProperty(u8),
    /// A property has a value the specification forbids (a zero receive maximum, a boolean
    /// other than 0 or 1, ...).
    #[error("invalid value for property 0x{0:02X}")]
    InvalidPropertyValue(u8),
    /// The property length runs past the end of the packet.
    #[error("property length exceeds the packet")]
    PropertyLength,
    /// A reason code that this packet may not carry [MQTT-2.4].
    #[error("invalid reason code 0x{code:02X} in {packet:?}")]
    InvalidReasonCode {
        /// The byte received.
        code: u8,
        /// The packet type.
        packet: PacketType,
    },
    /// The first packet on a connection is not CONNECT [MQTT-3.1.0-1].
    #[error("first packet is not CONNECT")]
    ExpectedConnect,
    /// An error inside a CONNECT whose protocol level was already read: the answer must be a
    /// CONNACK in that version's format.
    #[error("in CONNECT for MQTT {version}: {error}")]
    InConnect {
        /// The version the client asked for.
        version: ProtocolVersion,
        /// What went wrong.
        error: Box<Self>,
    },
}

impl DecodeError {
    /// The reason code that answers this error in CONNACK (before the session is up) or
    /// DISCONNECT (after).
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Self::PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            Self::InvalidProtocolName | Self::UnsupportedProtocolLevel(_) => {
                ReasonCode::UnsupportedProtocolVersion
            }
            Self::InvalidString {
                error: StringError::WildcardInTopicName,
                ..
            } => ReasonCode::TopicNameInvalid,
            Self::InvalidString {
                field: "client identifier",
                ..
            } => ReasonCode::ClientIdentifierNotValid,
            Self::PropertyNotAllowed { .. }
            | Self::DuplicateProperty(_)
            | Self::InvalidPropertyValue(_)
            | Self::MissingTopic
            | Self::NoTopicFilters(_)
            | Self::InvalidRetainHandling
            | Self::ExpectedConnect => ReasonCode::ProtocolError,
            Self::InConnect { error, .. } => error.reason_code(),
            _ => ReasonCode::MalformedPacket,
        }
    }

    /// For an error inside CONNECT, the protocol version whose CONNACK format answers it.
    pub fn connect_version(&self) -> Option<ProtocolVersion> {
        match self {
            Self::InConnect { version, .. } => Some(*version),
            _ => None,
        }
    }
}

/// Why a packet could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The packet does not exist in the connection's protocol version (AUTH in 3.1.1).
    #[error("{0:?} does not exist before MQTT 5")]
    NotInVersion(PacketType),
    /// A QoS 1 or 2 PUBLISH has no packet identifier, or a QoS 0 one has one.
    #[error("PUBLISH packet identifier does not match its QoS")]
    PacketIdMismatch,
    /// The encoded packet would exceed the largest remaining length MQTT can express.
    #[error("packet too large to encode")]
    TooLarge,
}
