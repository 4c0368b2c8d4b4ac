//! MQTT 5 reason codes and their MQTT 3.1.1 counterparts.

use std::fmt;

macro_rules! reason_codes {
    ($($(#[$doc:meta])* $name:ident = $value:literal,)*) => {
        /// An MQTT 5 reason code (MQTT 5.0 section 2.4). Which codes a packet may carry is
        /// checked by [`ReasonCode::valid_for`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum ReasonCode {
            $($(#[$doc])* $name = $value,)*
        }

        impl ReasonCode {
            /// Parses a reason code byte; unknown values yield `None`.
            pub fn from_u8(value: u8) -> Option<Self> {
                match value {
                    $($value => Some(Self::$name),)*
                    _ => None,
                }
            }

            fn name(self) -> &'static str {
                match self {
                    $(Self::$name => stringify!($name),)*
                }
            }
        }
    };
}

reason_codes! {
    /// Success, normal disconnection or granted QoS 0.
    Success = 0x00,
    /// Granted QoS 1.
    GrantedQoS1 = 0x01,
    /// Granted QoS 2.
    GrantedQoS2 = 0x02,
    /// Disconnect and publish the will message.
    DisconnectWithWillMessage = 0x04,
    /// The message was accepted but nobody is subscribed.
    NoMatchingSubscribers = 0x10,
    /// No subscription existed for the filter.
    NoSubscriptionExisted = 0x11,
    /// Continue the authentication exchange.
    ContinueAuthentication = 0x18,
    /// Start re-authentication.
    ReAuthenticate = 0x19,
    /// Unspecified error.
    UnspecifiedError = 0x80,
    /// The packet could not be parsed.
    MalformedPacket = 0x81,
    /// The packet broke a protocol rule.
    ProtocolError = 0x82,
    /// Valid, but the receiver will not process it.
    ImplementationSpecificError = 0x83,
    /// The server does not support the requested protocol version.
    UnsupportedProtocolVersion = 0x84,
    /// The client identifier is valid but not allowed.
    ClientIdentifierNotValid = 0x85,
    /// The user name or password is wrong.
    BadUserNameOrPassword = 0x86,
    /// The client is not authorized.
    NotAuthorized = 0x87,
    /// The server is not available.
    ServerUnavailable = 0x88,
    /// The server is busy.
    ServerBusy = 0x89,
    /// The client has been banned.
    Banned = 0x8A,
    /// The server is shutting down.
    ServerShuttingDown = 0x8B,
    /// The authentication method is not supported or does not match.
    BadAuthenticationMethod = 0x8C,
    /// No packet arrived within 1.5 times the keep alive.
    KeepAliveTimeout = 0x8D,
    /// Another connection took over this session.
    SessionTakenOver = 0x8E,
    /// The topic filter is well formed but not accepted.
    TopicFilterInvalid = 0x8F,
    /// The topic name is well formed but not accepted.
    TopicNameInvalid = 0x90,
    /// The packet identifier is already in use.
    PacketIdentifierInUse = 0x91,
    /// The packet identifier is not known.
    PacketIdentifierNotFound = 0x92,
    /// More QoS > 0 publications in flight than the receive maximum allows.
    ReceiveMaximumExceeded = 0x93,
    /// The topic alias is invalid.
    TopicAliasInvalid = 0x94,
    /// The packet exceeds the maximum packet size.
    PacketTooLarge = 0x95,
    /// The message rate is too high.
    MessageRateTooHigh = 0x96,
    /// A quota was exceeded.
    QuotaExceeded = 0x97,
    /// An administrative action closed the connection.
    AdministrativeAction = 0x98,
    /// The payload does not match the payload format indicator.
    PayloadFormatInvalid = 0x99,
    /// Retained messages are not supported.
    RetainNotSupported = 0x9A,
    /// The QoS is higher than the server supports.
    QoSNotSupported = 0x9B,
    /// The client should temporarily use another server.
    UseAnotherServer = 0x9C,
    /// The client should permanently use another server.
    ServerMoved = 0x9D,
    /// Shared subscriptions are not supported.
    SharedSubscriptionsNotSupported = 0x9E,
    /// The connection rate limit was exceeded.
    ConnectionRateExceeded = 0x9F,
    /// The maximum connection time was reached.
    MaximumConnectTime = 0xA0,
    /// Subscription identifiers are not supported.
    SubscriptionIdentifiersNotSupported = 0xA1,
    /// Wildcard subscriptions are not supported.
    WildcardSubscriptionsNotSupported = 0xA2,
}

/// The packets that carry reason codes, for [`ReasonCode::valid_for`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonContext {
    /// CONNACK.
    ConnAck,
    /// PUBACK and PUBREC.
    PubAckRec,
    /// PUBREL and PUBCOMP.
    PubRelComp,
    /// SUBACK.
    SubAck,
    /// UNSUBACK.
    UnsubAck,
    /// DISCONNECT.
    Disconnect,
    /// AUTH.
    Auth,
}

impl ReasonCode {
    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// Whether the code reports a failure (0x80 and above).
    pub fn is_error(self) -> bool {
        self.as_u8() >= 0x80
    }

    /// Whether the specification allows this code in the given packet.
    pub fn valid_for(self, context: ReasonContext) -> bool {
        use ReasonCode::*;
        match context {
            ReasonContext::ConnAck => matches!(
                self,
                Success
                    | UnspecifiedError
                    | MalformedPacket
                    | ProtocolError
                    | ImplementationSpecificError
                    | UnsupportedProtocolVersion
                    | ClientIdentifierNotValid
                    | BadUserNameOrPassword
                    | NotAuthorized
                    | ServerUnavailable
                    | ServerBusy
                    | Banned
                    | BadAuthenticationMethod
                    | TopicNameInvalid
                    | PacketTooLarge
                    | QuotaExceeded
                    | PayloadFormatInvalid
                    | RetainNotSupported
                    | QoSNotSupported
                    | UseAnotherServer
                    | ServerMoved
                    | ConnectionRateExceeded
            ),
            ReasonContext::PubAckRec => matches!(
                self,
                Success
                    | NoMatchingSubscribers
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicNameInvalid
                    | PacketIdentifierInUse
                    | QuotaExceeded
                    | PayloadFormatInvalid
            ),
            ReasonContext::PubRelComp => matches!(self, Success | PacketIdentifierNotFound),
            ReasonContext::SubAck => matches!(
                self,
                Success
                    | GrantedQoS1
                    | GrantedQoS2
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicFilterInvalid
                    | PacketIdentifierInUse
                    | QuotaExceeded
                    | SharedSubscriptionsNotSupported
                    | SubscriptionIdentifiersNotSupported
                    | WildcardSubscriptionsNotSupported
            ),
            ReasonContext::UnsubAck => matches!(
                self,
                Success
                    | NoSubscriptionExisted
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicFilterInvalid
                    | PacketIdentifierInUse
            ),
            ReasonContext::Disconnect => !matches!(
                self,
                GrantedQoS1
                    | GrantedQoS2
                    | NoMatchingSubscribers
                    | NoSubscriptionExisted
                    | ContinueAuthentication
                    | ReAuthenticate
                    | ClientIdentifierNotValid
                    | BadUserNameOrPassword
                    | ServerUnavailable
                    | Banned
                    | BadAuthenticationMethod
                    | PacketIdentifierInUse
                    | PacketIdentifierNotFound
                    | UnsupportedProtocolVersion
            ),
            ReasonContext::Auth => {
                matches!(self, Success | ContinueAuthentication | ReAuthenticate)
            }
        }
    }

    /// The MQTT 3.1/3.1.1 CONNACK return code that best answers a refused CONNECT.
    pub fn v3_connect_return_code(self) -> u8 {
        use ReasonCode::*;
        match self {
            Success => 0x00,
            UnsupportedProtocolVersion => 0x01,
            ClientIdentifierNotValid => 0x02,
            BadUserNameOrPassword | BadAuthenticationMethod => 0x04,
            NotAuthorized | Banned => 0x05,
            _ => 0x03,
        }
    }

    /// Reads an MQTT 3.1/3.1.1 CONNACK return code as a reason code.
    pub fn from_v3_connect_return_code(code: u8) -> Option<Self> {
        use ReasonCode::*;
        Some(match code {
            0x00 => Success,
            0x01 => UnsupportedProtocolVersion,
            0x02 => ClientIdentifierNotValid,
            0x03 => ServerUnavailable,
            0x04 => BadUserNameOrPassword,
            0x05 => NotAuthorized,
            _ => return None,
        })
    }
}

/// The reason code to put in a PUBACK or PUBREC: MQTT 3 has none; an MQTT 5 code that these
/// packets may not carry becomes 0x80 if it reports a failure, 0x00 otherwise.
pub(crate) fn puback_reason(v5: bool, reason: ReasonCode) -> ReasonCode {
    match (
        v5,
        reason.valid_for(ReasonContext::PubAckRec),
        reason.is_error(),
    ) {
        (false, _, _) | (true, false, false) => ReasonCode::Success,
        (true, true, _) => reason,
        (true, false, true) => ReasonCode::UnspecifiedError,
    }
}

/// `reason` if `context` allows it; otherwise 0x80 for a failure and 0x00 for anything else,
/// so that a caller's stray code never makes a packet the peer must refuse as malformed.
pub(crate) fn reason_for(context: ReasonContext, reason: ReasonCode) -> ReasonCode {
    if reason.valid_for(context) {
        reason
    } else if reason.is_error() {
        ReasonCode::UnspecifiedError
    } else {
        ReasonCode::Success
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (0x{:02X})", self.name(), self.as_u8())
    }
}
