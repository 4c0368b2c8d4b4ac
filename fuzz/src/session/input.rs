//! The `session` target's input: a setup and a sequence of operations, built by `arbitrary`.
//!
//! Every type is declared through [`input!`], which derives `Arbitrary` and also writes an
//! [`Encode`] impl that produces the bytes `Arbitrary` reads the same value back from. The seed
//! program uses it to turn hand-written scenarios into corpus files, so the two can never drift
//! apart (it checks the round trip too).
//!
//! Numbers are raw `u8`/`u16`/`u32` that the harness maps onto choices, with zero meaning the
//! default wherever there is one, so that small mutations move between neighbouring choices and
//! an all-zero setup is the usual configuration.

use arbitrary::Arbitrary;

/// Writes a value as the bytes `Arbitrary` decodes it from.
pub trait Encode {
    /// Appends the encoding of `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// The encoding of `self`.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

macro_rules! encode_int {
    ($($ty:ty),*) => {$(
        impl Encode for $ty {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
encode_int!(u8, u16, u32);

impl Encode for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl<T: Encode> Encode for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        self.is_some().encode(out);
        if let Some(value) = self {
            value.encode(out);
        }
    }
}

/// `arbitrary` reads a collection as "another element?" flags, each followed by an element.
impl<T: Encode> Encode for Vec<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        for item in self {
            true.encode(out);
            item.encode(out);
        }
        false.encode(out);
    }
}

/// Derived enums pick variant `index` of `count` as `(u32 * count) >> 32`; this writes the
/// smallest `u32` that picks `index`.
pub fn encode_variant(index: usize, count: usize, out: &mut Vec<u8>) {
    let (index, count) = (index as u64, count as u64);
    let selector = (index << 32).div_ceil(count);
    debug_assert_eq!((selector * count) >> 32, index);
    (selector as u32).encode(out);
}

/// Declares a struct with named fields or an enum with unit or struct variants, deriving
/// `Arbitrary` and writing the matching [`Encode`] impl.
macro_rules! input {
    (
        $(#[$meta:meta])*
        struct $name:ident { $($(#[$fmeta:meta])* $field:ident : $ty:ty),* $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Default, Arbitrary)]
        pub struct $name { $($(#[$fmeta])* pub $field: $ty,)* }

        impl Encode for $name {
            fn encode(&self, out: &mut Vec<u8>) {
                $(self.$field.encode(out);)*
            }
        }
    };
    (
        $(#[$meta:meta])*
        enum $name:ident {
            $(
                $(#[$vmeta:meta])*
                $variant:ident $({ $($(#[$fmeta:meta])* $field:ident : $ty:ty),* $(,)? })?
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Arbitrary)]
        #[allow(missing_docs)]
        pub enum $name {
            $($(#[$vmeta])* $variant $({ $($(#[$fmeta])* $field: $ty,)* })?,)*
        }

        impl Encode for $name {
            fn encode(&self, out: &mut Vec<u8>) {
                let count = [$(stringify!($variant)),*].len();
                let mut index = 0;
                $(
                    if let Self::$variant $({ $($field),* })? = self {
                        encode_variant(index, count, out);
                        $($($field.encode(out);)*)?
                        return;
                    }
                    index += 1;
                )*
                unreachable!("{index} variants, none matched");
            }
        }
    };
}

input! {
    /// One fuzz case: which role is driven, its setup, and what happens.
    enum Input {
        /// A broker's connection: the fuzzer plays the client and the broker.
        Server { setup: ServerSetup, ops: Vec<ServerOp> },
        /// A client's connection: the fuzzer plays the server and the application.
        Client { setup: ClientSetup, ops: Vec<ClientOp> },
    }
}

input! {
    /// The server's configuration; zero fields keep the defaults.
    struct ServerSetup {
        /// `receive_maximum` (0: default).
        receive_maximum: u8,
        /// `max_inflight_messages` (0: default).
        max_inflight: u8,
        /// `topic_alias_maximum`, modulo 5 (0: default).
        topic_alias_maximum: u8,
        /// `maximum_qos`: 0 → 2, 1 → 1, 2 → 0.
        maximum_qos: u8,
        /// Bits turning features off: retain, subscription identifiers, wildcards, shared.
        unavailable: u8,
        /// `max_keepalive` in seconds (0: no limit).
        max_keepalive: u8,
        /// `max_packet_size` is 64 + this (0: default).
        max_packet_size: u16,
        /// `max_session_expiry` (0: never expires).
        max_session_expiry: u32,
        /// Limits of fresh sessions.
        queue: QueueSpec,
    }
}

input! {
    /// Queue limits of a fresh session.
    struct QueueSpec {
        /// Most queued messages (0: default).
        max_messages: u8,
        /// Most queued bytes (0: unlimited).
        max_bytes: u16,
    }
}

input! {
    /// A step of a server-role case.
    enum ServerOp {
        // What the client sends.
        Connect { spec: ConnectSpec },
        Publish { spec: PublishSpec },
        PubAck { ack: AckSpec },
        PubRec { ack: AckSpec },
        PubRel { ack: AckSpec },
        PubComp { ack: AckSpec },
        Subscribe { id: u16, filters: Vec<FilterSpec>, subscription_id: u32 },
        Unsubscribe { id: u16, filters: Vec<u8> },
        PingReq,
        Disconnect { reason: u8, session_expiry: Option<u32>, reason_string: bool },
        Auth { spec: AuthSpec },
        /// Bytes as they come off the wire; `keep_partial` keeps an incomplete packet's bytes
        /// for the next op.
        Raw { bytes: Vec<u8>, keep_partial: bool },
        ConnectionLost,
        // What the broker decides.
        Accept {
            session: SessionChoice,
            assign_client_id: bool,
            auth_data: Option<u8>,
            user_properties: u8,
            response_information: bool,
        },
        Reject { reason: u8 },
        AuthContinue { data: Option<u8> },
        ReauthSuccess { data: Option<u8> },
        PublishAck { id: IdRef, reason: u8 },
        SubscribeAck { id: IdRef, reasons: Vec<u8> },
        UnsubscribeAck { id: IdRef, reasons: Vec<u8> },
        Deliver { message: MessageSpec, subscription_ids: Vec<u32> },
        ServerDisconnect { reason: u8 },
        // Time and lifecycle.
        /// Moves the clock; with `fire`, runs the timers that are due, as a driver does.
        Advance { time: TimeStep, fire: bool },
        /// Calls `handle_timeout(now)` whether or not anything is due.
        Timeout,
        /// Ends the connection if it is open (takeover or lost transport), optionally
        /// acknowledges what the broker still owes, stores the session and opens a new one.
        NewConnection { takeover: bool, ack_pending: bool },
        /// Runs a stored session's own timers (will delay, expiry).
        SessionTimers { index: u8 },
    }
}

input! {
    /// The client's configuration; zero fields keep the defaults.
    struct ClientSetup {
        /// 0 → 5.0, 1 → 3.1.1, 2 → 3.1.
        version: u8,
        /// Resume a session instead of a clean start.
        resume: bool,
        /// Keep alive in seconds (0: disabled).
        keep_alive: u16,
        /// Receive maximum (0: 65535).
        receive_maximum: u16,
        /// Maximum packet size is 64 + this (0: default).
        max_packet_size: u16,
        /// Topic alias maximum, modulo 5.
        topic_alias_maximum: u8,
        /// Enhanced authentication method, see `METHODS` (0: none).
        auth_method: u8,
        /// Initial authentication data.
        auth_data: Option<u8>,
        /// The application acknowledges messages itself.
        manual_ack: bool,
        /// Requested session expiry.
        session_expiry: u32,
        /// Whether a user name and a password are configured.
        username: bool,
        password: bool,
        /// A will.
        will: Option<WillSpec>,
        /// Queue limits.
        queue: QueueSpec,
    }
}

input! {
    /// A step of a client-role case.
    enum ClientOp {
        // What the server sends.
        ConnAck { spec: ConnAckSpec },
        Publish { spec: PublishSpec },
        PubAck { ack: AckSpec },
        PubRec { ack: AckSpec },
        PubRel { ack: AckSpec },
        PubComp { ack: AckSpec },
        SubAck { id: IdRef, reasons: Vec<u8> },
        UnsubAck { id: IdRef, reasons: Vec<u8> },
        PingResp,
        Disconnect { reason: u8, reason_string: bool },
        Auth { spec: AuthSpec },
        Raw { bytes: Vec<u8>, keep_partial: bool },
        ConnectionLost,
        // What the application calls.
        AppPublish { message: MessageSpec },
        AppSubscribe { filters: Vec<FilterSpec>, subscription_id: u32 },
        AppUnsubscribe { filters: Vec<u8> },
        AppAck { id: IdRef, reason: u8 },
        AppAuthContinue { data: Option<u8> },
        AppReauthenticate { data: Option<u8> },
        AppDisconnect { reason: u8, session_expiry: Option<u32> },
        // Time and lifecycle.
        Advance { time: TimeStep, fire: bool },
        Timeout,
        /// Ends the connection if it is open and starts a new one with the session.
        NewConnection { clean_start: bool },
    }
}

input! {
    /// A CONNECT.
    struct ConnectSpec {
        /// 0 → 5.0, 1 → 3.1.1, 2 → 3.1.
        version: u8,
        /// Clean session is the default; this asks to resume.
        resume: bool,
        keep_alive: u16,
        /// See `CLIENT_IDS`.
        client_id: u8,
        will: Option<WillSpec>,
        username: bool,
        password: bool,
        session_expiry: Option<u32>,
        /// 0: absent.
        receive_maximum: u16,
        /// 0: absent.
        maximum_packet_size: u32,
        topic_alias_maximum: Option<u16>,
        request_response_information: bool,
        user_properties: u8,
        /// See `METHODS` (0: none).
        auth_method: u8,
        auth_data: Option<u8>,
    }
}

input! {
    /// A will message.
    struct WillSpec {
        topic: u8,
        qos: u8,
        retain: bool,
        payload: u8,
        delay: Option<u32>,
        expiry: Option<u32>,
    }
}

input! {
    /// An application message: topic, QoS, size and properties.
    struct MessageSpec {
        /// See `TOPICS`.
        topic: u8,
        /// Modulo 3.
        qos: u8,
        retain: bool,
        /// Payload bytes are 4 times this.
        payload: u8,
        /// Message expiry interval in seconds.
        expiry: Option<u32>,
        /// Bits: user properties, response topic, correlation data, content type, payload
        /// format indicator.
        properties: u8,
    }
}

input! {
    /// A PUBLISH packet from the peer.
    struct PublishSpec {
        message: MessageSpec,
        dup: bool,
        /// Packet identifier, for QoS 1 and 2.
        id: IdRef,
        /// Topic alias (0: none); with an odd topic choice the topic is left empty.
        alias: u16,
        /// Subscription identifier (0: none).
        subscription_id: u32,
    }
}

input! {
    /// PUBACK, PUBREC, PUBREL or PUBCOMP.
    struct AckSpec {
        id: IdRef,
        /// See `REASONS`.
        reason: u8,
        reason_string: bool,
    }
}

input! {
    /// AUTH.
    struct AuthSpec {
        /// See `REASONS`.
        reason: u8,
        /// See `METHODS`.
        method: u8,
        data: Option<u8>,
    }
}

input! {
    /// A CONNACK.
    struct ConnAckSpec {
        /// See `REASONS`.
        reason: u8,
        session_present: bool,
        session_expiry: Option<u32>,
        /// 0: absent.
        receive_maximum: u16,
        /// 0: absent, 1: QoS 0, 2: QoS 1, else absent.
        maximum_qos: u8,
        /// 0: absent, 1: false, else true.
        retain_available: u8,
        /// 0: absent.
        maximum_packet_size: u32,
        assigned_client_id: bool,
        topic_alias_maximum: u16,
        server_keep_alive: Option<u16>,
        /// See `METHODS`.
        auth_method: u8,
        auth_data: Option<u8>,
        user_properties: u8,
    }
}

input! {
    /// A topic filter and its options.
    struct FilterSpec {
        /// See `FILTERS`.
        filter: u8,
        qos: u8,
        no_local: bool,
        retain_as_published: bool,
        retain_handling: u8,
    }
}

input! {
    /// A packet identifier: one the harness knows is pending, or any.
    enum IdRef {
        /// The `index`-th most recent identifier of the list that fits the operation.
        Recent { index: u8 },
        /// This value (0 becomes 1).
        Raw { id: u16 },
    }
}

impl Default for IdRef {
    fn default() -> Self {
        Self::Recent { index: 0 }
    }
}

input! {
    /// Which session the broker accepts a connection with.
    enum SessionChoice {
        Fresh,
        /// A stored session, taken out of the store.
        Stored { index: u8 },
        /// A copy of a stored session, left in the store (a stale durable copy).
        StoredCopy { index: u8 },
    }
}

// Not derived: `input!` declares the enum.
#[allow(clippy::derivable_impls)]
impl Default for SessionChoice {
    fn default() -> Self {
        Self::Fresh
    }
}

input! {
    /// How far the clock moves.
    struct TimeStep {
        amount: u16,
        /// Modulo 4: milliseconds, seconds, kiloseconds, 2^20 seconds.
        unit: u8,
    }
}
