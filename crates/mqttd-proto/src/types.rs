//! Protocol values as newtypes: once parsed, a value is valid everywhere.
//!
//! Strings are backed by [`Bytes`] so that decoding a packet slices the frame instead of
//! copying it.

use std::fmt;
use std::num::NonZeroU16;
use std::ops::Deref;

use bytes::Bytes;

/// The protocol level a client asked for in CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolVersion {
    /// MQTT 3.1, protocol name `MQIsdp`, level 3.
    V3_1,
    /// MQTT 3.1.1, protocol name `MQTT`, level 4.
    V3_1_1,
    /// MQTT 5.0, protocol name `MQTT`, level 5.
    V5,
}

impl ProtocolVersion {
    /// The protocol level byte sent in CONNECT.
    pub fn level(self) -> u8 {
        match self {
            Self::V3_1 => 3,
            Self::V3_1_1 => 4,
            Self::V5 => 5,
        }
    }

    /// The protocol name sent in CONNECT.
    pub fn protocol_name(self) -> &'static str {
        match self {
            Self::V3_1 => "MQIsdp",
            Self::V3_1_1 | Self::V5 => "MQTT",
        }
    }

    /// Whether packets carry properties and reason codes.
    pub fn is_v5(self) -> bool {
        self == Self::V5
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V3_1 => "3.1",
            Self::V3_1_1 => "3.1.1",
            Self::V5 => "5.0",
        })
    }
}

/// Quality of service of a message or subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum QoS {
    /// Fire and forget.
    #[default]
    AtMostOnce = 0,
    /// Acknowledged with PUBACK; may be delivered more than once.
    AtLeastOnce = 1,
    /// Four-step PUBREC/PUBREL/PUBCOMP flow; delivered exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// Parses the two QoS bits; 3 is not a QoS.
    pub fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Self::AtMostOnce),
            1 => Some(Self::AtLeastOnce),
            2 => Some(Self::ExactlyOnce),
            _ => None,
        }
    }

    /// The wire value.
    pub fn bits(self) -> u8 {
        self as u8
    }
}

/// A packet identifier; zero is never a valid identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PacketId(NonZeroU16);

impl PacketId {
    /// The first identifier an allocator hands out.
    pub const MIN: Self = Self(NonZeroU16::MIN);

    /// Returns `None` for zero.
    pub fn new(value: u16) -> Option<Self> {
        NonZeroU16::new(value).map(Self)
    }

    /// The wire value.
    pub fn get(self) -> u16 {
        self.0.get()
    }

    /// The identifier after this one, wrapping from 65535 to 1.
    pub fn next(self) -> Self {
        Self(self.0.checked_add(1).unwrap_or(NonZeroU16::MIN))
    }
}

impl fmt::Display for PacketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which stream of a connection a packet travels on.
///
/// An opaque, connection-scoped identity chosen by the transport driver. Byte-stream transports
/// (TCP, TLS, WebSocket, a single QUIC stream) carry everything on [`StreamId::CONTROL`]. MQTT
/// over QUIC in multi-stream mode carries the connection on a control stream plus data streams;
/// a driver that maps the control stream to `CONTROL` and every data stream to its own value
/// gets the stream rules of the protocol core (acknowledgements on the stream of the packet
/// they answer, deliveries on the stream of their subscription, topic aliases per stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct StreamId(u64);

impl StreamId {
    /// The control stream: CONNECT, CONNACK, PING, DISCONNECT and AUTH travel on it, and
    /// everything owed to a stream that was lost moves to it.
    pub const CONTROL: Self = Self(0);

    /// A stream the driver numbers `value` (a QUIC driver may use the QUIC stream id, whose
    /// first client stream, 0, is the control stream).
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The driver's number for this stream.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// Whether this is the control stream.
    pub const fn is_control(self) -> bool {
        self.0 == Self::CONTROL.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StringError {
    /// The bytes are not valid UTF-8 [MQTT-1.5.4-1].
    #[error("not valid UTF-8")]
    InvalidUtf8,
    /// The string contains U+0000 [MQTT-1.5.4-2].
    #[error("contains the null character U+0000")]
    NullCharacter,
    /// The string is longer than the 65,535 bytes a length prefix can describe.
    #[error("longer than 65535 bytes")]
    TooLong,
    /// A topic name or filter must be at least one character long [MQTT-4.7.3-1].
    #[error("empty")]
    Empty,
    /// A topic name contains `+` or `#` [MQTT-3.3.2-2].
    #[error("topic name contains a wildcard")]
    WildcardInTopicName,
    /// A `+` or `#` does not occupy a whole level, or `#` is not the last level
    /// [MQTT-4.7.1-1, MQTT-4.7.1-2].
    #[error("wildcard does not occupy a whole topic level or '#' is not last")]
    MisplacedWildcard,
    /// A `$share/` filter has an empty or invalid share name or no topic filter [MQTT-4.8.2-1,
    /// MQTT-4.8.2-2].
    #[error("malformed shared subscription")]
    InvalidShare,
}

/// A UTF-8 string as MQTT defines it: no U+0000 and at most 65,535 bytes, backed by `Bytes`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MqttStr(Bytes);

impl MqttStr {
    /// Validates `bytes` as an MQTT UTF-8 string without copying.
    pub fn from_bytes(bytes: Bytes) -> Result<Self, StringError> {
        if bytes.len() > usize::from(u16::MAX) {
            return Err(StringError::TooLong);
        }
        let s = std::str::from_utf8(&bytes).map_err(|_| StringError::InvalidUtf8)?;
        if s.contains('\0') {
            return Err(StringError::NullCharacter);
        }
        Ok(Self(bytes))
    }

    /// Validates a static string.
    pub fn from_static(s: &'static str) -> Result<Self, StringError> {
        Self::from_bytes(Bytes::from_static(s.as_bytes()))
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        // Constructors only accept valid UTF-8; this cannot fail.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The underlying bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// The same string in bytes of its own: a decoded one is a slice of its packet, which it
    /// keeps alive as long as it lives.
    pub fn detached(&self) -> Self {
        Self(Bytes::copy_from_slice(&self.0))
    }
}

impl TryFrom<&str> for MqttStr {
    type Error = StringError;
    fn try_from(s: &str) -> Result<Self, StringError> {
        Self::from_bytes(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl TryFrom<String> for MqttStr {
    type Error = StringError;
    fn try_from(s: String) -> Result<Self, StringError> {
        Self::from_bytes(Bytes::from(s))
    }
}

impl Deref for MqttStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for MqttStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for MqttStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! string_newtype_common {
    ($name:ident) => {
        impl $name {
            /// The string.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }

            /// The underlying MQTT string.
            pub fn as_mqtt_str(&self) -> &MqttStr {
                &self.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                self.0.as_str()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self.as_str(), f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl TryFrom<&str> for $name {
            type Error = StringError;
            fn try_from(s: &str) -> Result<Self, StringError> {
                Self::new(MqttStr::try_from(s)?)
            }
        }

        impl TryFrom<String> for $name {
            type Error = StringError;
            fn try_from(s: String) -> Result<Self, StringError> {
                Self::new(MqttStr::try_from(s)?)
            }
        }
    };
}

/// A client identifier. May be empty in CONNECT, asking the server to assign one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ClientId(MqttStr);

impl ClientId {
    /// Any MQTT string is a client identifier; whether the server accepts it is its policy.
    pub fn new(s: MqttStr) -> Result<Self, StringError> {
        Ok(Self(s))
    }

    /// Whether the client left the choice to the server.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The same identifier in bytes of its own: a decoded one is a slice of its packet, which
    /// it keeps alive as long as it lives.
    pub fn detached(&self) -> Self {
        Self(self.0.detached())
    }
}
string_newtype_common!(ClientId);

/// A topic name a message is published to: no wildcards.
///
/// The empty name exists only on the wire, in a PUBLISH that names its topic by alias; a
/// connection state machine resolves it before handing the message on.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(MqttStr);

impl TopicName {
    /// Parses a topic name: non-empty, no `+` or `#`.
    pub fn new(s: MqttStr) -> Result<Self, StringError> {
        if s.is_empty() {
            return Err(StringError::Empty);
        }
        Self::new_allow_empty(s)
    }

    /// As [`TopicName::new`], but accepts the empty name used with a topic alias.
    pub fn new_allow_empty(s: MqttStr) -> Result<Self, StringError> {
        if s.as_bytes().iter().any(|&b| b == b'+' || b == b'#') {
            return Err(StringError::WildcardInTopicName);
        }
        Ok(Self(s))
    }

    /// The empty name, sent when a topic alias stands for the topic.
    pub fn empty() -> Self {
        Self(MqttStr::default())
    }

    /// Whether this is the empty name of an aliased PUBLISH.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The topic levels, split on `/`.
    pub fn levels(&self) -> std::str::Split<'_, char> {
        self.as_str().split('/')
    }

    /// Whether the topic starts with `$`, which a wildcard in the first level does not match.
    pub fn is_system(&self) -> bool {
        self.as_str().starts_with('$')
    }
}
string_newtype_common!(TopicName);

/// A subscription's topic filter: wildcards occupy whole levels, `#` only last. Shared
/// subscriptions (`$share/{group}/{filter}`) are parsed as such.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter(MqttStr);

const SHARE_PREFIX: &str = "$share/";

impl TopicFilter {
    /// Parses a topic filter.
    pub fn new(s: MqttStr) -> Result<Self, StringError> {
        let text = s.as_str();
        if text.is_empty() {
            return Err(StringError::Empty);
        }
        let pattern = match text.strip_prefix(SHARE_PREFIX) {
            Some(rest) => {
                let (group, filter) = rest.split_once('/').ok_or(StringError::InvalidShare)?;
                if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
                    return Err(StringError::InvalidShare);
                }
                filter
            }
            None => text,
        };
        let mut levels = pattern.split('/').peekable();
        while let Some(level) = levels.next() {
            let has_wild = level.contains(['+', '#']);
            let ok = !has_wild || level == "+" || (level == "#" && levels.peek().is_none());
            if !ok {
                return Err(StringError::MisplacedWildcard);
            }
        }
        Ok(Self(s))
    }

    /// For `$share/{group}/{filter}`, the group and the filter; `None` otherwise.
    pub fn share(&self) -> Option<(&str, &str)> {
        self.as_str().strip_prefix(SHARE_PREFIX)?.split_once('/')
    }

    /// The filter matched against topics: the part after the share name, if shared.
    pub fn pattern(&self) -> &str {
        self.share().map_or(self.as_str(), |(_, f)| f)
    }

    /// Whether the filter contains a wildcard.
    pub fn has_wildcards(&self) -> bool {
        self.pattern().contains(['+', '#'])
    }

    /// Whether `topic` matches this filter (ignoring any share name). A wildcard in the first
    /// level does not match a topic starting with `$` [MQTT-4.7.2-1].
    pub fn matches(&self, topic: &TopicName) -> bool {
        let pattern = self.pattern();
        if topic.is_system() && pattern.starts_with(['+', '#']) {
            return false;
        }
        let mut filter_levels = pattern.split('/');
        let mut topic_levels = topic.levels();
        loop {
            match (filter_levels.next(), topic_levels.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(f), Some(t)) if f == t => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}
string_newtype_common!(TopicFilter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detached_string_holds_its_own_bytes() {
        let packet = Bytes::from_static(b"..client-1..");
        let id = ClientId::new(MqttStr::from_bytes(packet.slice(2..10)).unwrap()).unwrap();
        let own = id.detached();
        assert_eq!(own, id);
        assert_ne!(own.as_str().as_ptr(), id.as_str().as_ptr());
    }

    fn filter(s: &str) -> Result<TopicFilter, StringError> {
        TopicFilter::try_from(s)
    }

    fn topic(s: &str) -> TopicName {
        TopicName::try_from(s).expect("valid topic")
    }

    #[test]
    fn filters_parse_by_wildcard_rules() {
        for ok in [
            "#",
            "+",
            "a/+/b",
            "a/#",
            "+/+",
            "/",
            "$share/g/a/#",
            "sport/tennis/+",
        ] {
            assert!(filter(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a#",
            "a/#/b",
            "a+/b",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/",
        ] {
            assert!(filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn topic_names_refuse_wildcards_and_nul() {
        assert_eq!(
            TopicName::try_from("a/+").unwrap_err(),
            StringError::WildcardInTopicName
        );
        assert_eq!(
            TopicName::try_from("a\0").unwrap_err(),
            StringError::NullCharacter
        );
        assert_eq!(TopicName::try_from("").unwrap_err(), StringError::Empty);
    }

    #[test]
    fn matching_follows_the_spec_examples() {
        let f = filter("sport/tennis/player1/#").unwrap();
        assert!(f.matches(&topic("sport/tennis/player1")));
        assert!(f.matches(&topic("sport/tennis/player1/ranking")));
        assert!(!f.matches(&topic("sport/tennis/player2")));
        assert!(filter("sport/#").unwrap().matches(&topic("sport")));
        assert!(filter("sport/+").unwrap().matches(&topic("sport/")));
        assert!(!filter("sport/+").unwrap().matches(&topic("sport")));
        assert!(filter("+/+").unwrap().matches(&topic("/finance")));
        assert!(filter("/+").unwrap().matches(&topic("/finance")));
        assert!(!filter("+").unwrap().matches(&topic("/finance")));
        assert!(!filter("#").unwrap().matches(&topic("$SYS/x")));
        assert!(!filter("+/monitor").unwrap().matches(&topic("$SYS/monitor")));
        assert!(filter("$SYS/#").unwrap().matches(&topic("$SYS/monitor")));
        assert!(filter("$share/g/a/+").unwrap().matches(&topic("a/b")));
    }

    #[test]
    fn packet_ids_wrap_past_zero() {
        assert_eq!(PacketId::new(u16::MAX).unwrap().next(), PacketId::MIN);
        assert!(PacketId::new(0).is_none());
    }
}
